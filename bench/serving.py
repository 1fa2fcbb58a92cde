"""Online serving benchmark: sends a workload to a running server and reports throughput and latency percentiles.

    python bench/serving.py --base-url http://127.0.0.1:30000 --backend radixlm --dataset random-ids \
        --num-prompts 64 --random-input-len 128 --random-output-len 32 --request-rate 4 --max-concurrency 32

Backends:
  radixlm  SGLang's native streaming ``POST /generate`` (input_ids, sampling_params)
  openai   ``POST /v1/completions`` with ``stream: true`` (works against any OpenAI-compatible server: radixlm,
           SGLang, vLLM, ...); token-id prompts are sent as lists of ids, ``random`` prompts as text
Requests arrive as a Poisson process at --request-rate per second (inf: all at once), at most --max-concurrency
in flight.  Every request is greedy with ``ignore_eos`` so it generates exactly its output length.
TTFT: time to the first streamed token; ITL: time between streamed chunks; E2E: whole request.
The HTTP client is a small asyncio one (no dependency beyond the standard library).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
import urllib.parse
from dataclasses import dataclass, field

from workloads import Workload, add_workload_args, make_workload


@dataclass
class Result:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


async def post_stream(url: str, body: dict, headers: dict[str, str]):
    """POST JSON and yield the ``data:`` payloads of the server-sent-event response as they arrive."""
    parts = urllib.parse.urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
    data = json.dumps(body).encode()
    head = [f"POST {parts.path} HTTP/1.1", f"Host: {parts.netloc}", "Content-Type: application/json",
            f"Content-Length: {len(data)}", "Connection: close", *(f"{k}: {v}" for k, v in headers.items())]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
    await writer.drain()
    try:
        status = (await reader.readline()).decode()
        response_headers = {}
        while (line := (await reader.readline()).decode().strip()):
            key, _, value = line.partition(":")
            response_headers[key.lower()] = value.strip()
        if " 200 " not in status:
            raise RuntimeError(f"{status.strip()}: {(await reader.read()).decode()[:300]}")
        chunked = response_headers.get("transfer-encoding") == "chunked"
        buffer = b""
        while True:
            if chunked:
                size = int((await reader.readline()).strip() or b"0", 16)
                if size == 0:
                    break
                buffer += await reader.readexactly(size)
                await reader.readline()
            else:
                piece = await reader.read(65536)
                if not piece:
                    break
                buffer += piece
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                for line in event.decode().splitlines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        yield json.loads(line[len("data: "):])
    finally:
        writer.close()


async def one_request(args: argparse.Namespace, prompt: list[int], text: str | None, output_len: int) -> Result:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if args.backend == "radixlm":
        url = args.base_url + "/generate"
        body = {"stream": True, "sampling_params": {"max_new_tokens": output_len, "temperature": 0.0,
                                                    "ignore_eos": True}}
        body.update({"text": text} if text is not None else {"input_ids": prompt})
    else:
        url = args.base_url + "/v1/completions"
        body = {"model": args.model, "prompt": text if text is not None else prompt, "max_tokens": output_len,
                "temperature": 0.0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    result = Result(ok=False, prompt_tokens=len(prompt))
    start = last = time.perf_counter()
    try:
        async for chunk in post_stream(url, body, headers):
            now = time.perf_counter()
            if args.backend == "radixlm":
                tokens = chunk["meta_info"]["completion_tokens"]
                result.prompt_tokens = chunk["meta_info"]["prompt_tokens"]
            elif chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
                result.prompt_tokens = chunk["usage"]["prompt_tokens"]
            else:
                tokens = result.output_tokens + (1 if chunk["choices"] and chunk["choices"][0].get("text") else 0)
            if tokens > result.output_tokens:
                if result.output_tokens == 0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
            result.output_tokens = max(result.output_tokens, tokens)
        result.e2e = time.perf_counter() - start
        result.ok = True
    except Exception as e:  # a failed request is counted and reported, not fatal
        result.error = f"{type(e).__name__}: {e}"
    return result


async def run(args: argparse.Namespace, work: Workload) -> tuple[list[Result], float]:
    rng = random.Random(args.seed)
    limit = asyncio.Semaphore(args.max_concurrency or len(work.prompts))

    async def limited(i: int) -> Result:
        async with limit:
            text = work.texts[i] if work.texts is not None else None
            return await one_request(args, work.prompts[i], text, work.output_lens[i])

    tasks = []
    start = time.perf_counter()
    for i in range(len(work.prompts)):
        tasks.append(asyncio.create_task(limited(i)))
        if args.request_rate != float("inf"):
            await asyncio.sleep(rng.expovariate(args.request_rate))
    results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - start


def percentiles(values: list[float]) -> str:
    if not values:
        return f"{'-':>9} {'-':>9} {'-':>9}"
    values = sorted(values)
    pick = [values[min(len(values) - 1, int(q * len(values)))] * 1000 for q in (0.5, 0.9, 0.99)]
    return " ".join(f"{v:>9.1f}" for v in pick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:30000")
    parser.add_argument("--backend", choices=["radixlm", "openai"], default="radixlm")
    parser.add_argument("--model", default="default", help="model name sent to OpenAI-compatible servers")
    parser.add_argument("--tokenizer", default=None, help="tokenizer for the workload (default: the embedded model)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--request-rate", type=float, default=float("inf"), help="requests per second (Poisson)")
    parser.add_argument("--max-concurrency", type=int, default=None)
    add_workload_args(parser)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    if args.tokenizer is None:
        from radixlm.models.embedded import embedded_model_path

        args.tokenizer = embedded_model_path()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    work = make_workload(args, len(tokenizer), tokenizer)
    results, elapsed = asyncio.run(run(args, work))
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    print(f"\nbackend {args.backend} at {args.base_url}, dataset {args.dataset}, {len(results)} requests, "
          f"request rate {args.request_rate}, max concurrency {args.max_concurrency}")
    print(f"{'succeeded / failed':<24} {len(ok)} / {len(failed)}" + (f"  (first error: {failed[0].error})"
                                                                      if failed else ""))
    print(f"{'duration (s)':<24} {elapsed:.2f}")
    print(f"{'request throughput':<24} {len(ok) / elapsed:.2f} req/s")
    print(f"{'input throughput':<24} {sum(r.prompt_tokens for r in ok) / elapsed:.1f} tok/s")
    print(f"{'output throughput':<24} {sum(r.output_tokens for r in ok) / elapsed:.1f} tok/s")
    print(f"{'latency (ms)':<24} {'p50':>9} {'p90':>9} {'p99':>9}")
    print(f"{'TTFT':<24} {percentiles([r.ttft for r in ok])}")
    print(f"{'ITL':<24} {percentiles([x for r in ok for x in r.itl])}")
    print(f"{'E2E':<24} {percentiles([r.e2e for r in ok])}")


if __name__ == "__main__":
    main()
