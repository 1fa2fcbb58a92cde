"""FP8 served end to end: the ``Engine`` with ``--quantization fp8`` on the embedded model; ``radixlm serve`` with
online FP8 weights and an FP8 KV cache through the OpenAI chat API; ``radixlm serve`` on block-wise FP8
checkpoints, dense and mixture-of-experts (native /generate, token ids in and out).  Each answer equals the
static batch's greedy tokens with the same weights and cache (parity with HF is in tests/parity/test_fp8*.py)."""

from __future__ import annotations

import pytest

import radixlm
from radixlm.executor.static_batch import generate_static
from radixlm.sampling import SamplingParams

from conftest import build_tiny_fp8_model, make_worker
from server_harness import LiveServer


def static_greedy(path: str | None, ids: list[int], n: int, **kwargs) -> list[int]:
    worker = make_worker(path, **kwargs)
    return generate_static(worker, [ids], SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True))[0]


def test_engine_online_fp8(embedded_tokenizer):
    ids = embedded_tokenizer("The capital of France is").input_ids
    want = static_greedy(None, ids, 6, quantization="fp8")
    with radixlm.Engine(quantization="fp8", dtype="float32", max_total_tokens=2048, random_seed=0) as engine:
        out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 6, "temperature": 0,
                                                              "ignore_eos": True})
        assert out["output_ids"] == want
        assert out["text"] == embedded_tokenizer.decode(want, skip_special_tokens=True)


def test_serve_online_fp8_with_fp8_kv_cache(embedded_tokenizer):
    server = LiveServer("--quantization", "fp8", "--kv-cache-dtype", "fp8_e4m3", "--max-total-tokens", "2048")
    try:
        import openai

        client = openai.OpenAI(base_url=server.base + "/v1", api_key="none")
        messages = [{"role": "user", "content": "Name a large river."}]
        chat = client.chat.completions.create(model="any", messages=messages, max_tokens=8, temperature=0,
                                              extra_body={"ignore_eos": True})
        prompt = embedded_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        want = static_greedy(None, list(prompt["input_ids"]), 8, quantization="fp8", kv_cache_dtype="fp8_e4m3")
        assert chat.usage.completion_tokens == 8
        assert chat.choices[0].message.content == embedded_tokenizer.decode(want, skip_special_tokens=True)
        info = server.server_info()
        assert info["quantization"] == "fp8" and info["kv_cache_dtype"] == "fp8_e4m3"
    finally:
        server.stop()


@pytest.mark.parametrize("name,block", [("llama", (16, 16)), ("deepseek_v3", (16, 8))])  # V3: 24-wide o_proj input
def test_serve_block_fp8_checkpoint(tmp_path, name, block):
    path = str(tmp_path)
    build_tiny_fp8_model(name, path, block=block)
    ids = list(range(10, 40))
    want = static_greedy(path, ids, 8)
    server = LiveServer("--model-path", path, "--skip-tokenizer-init", "--max-total-tokens", "2048")
    try:
        status, body = server.request("POST", "/generate", {"input_ids": ids, "sampling_params": {
            "max_new_tokens": 8, "temperature": 0, "ignore_eos": True}})
        assert status == 200 and body["output_ids"] == want
    finally:
        server.stop()
