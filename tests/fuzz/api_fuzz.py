"""Fuzzing the HTTP API: the server under test, the calls, and the invariants.

``FuzzServer`` serves a tiny random-weight Llama with the embedded model's tokenizer; ``call`` sends one
``fuzz_cases.Case`` with a bounded time; ``check(case, reply)`` states the invariants of one reply and
``assert_idle`` those of the server after a run.  Used by ``tests/fuzz/test_fuzz_api.py`` (a short run in CI) and
``bench/fuzz.py`` (long runs).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

from fuzz_cases import Case

# ---------------------------------------------------------------------------------------------------- the server
TINY_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=512, dtype="float32")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
CONTEXT_LENGTH = 512
# A tiny random-weight Llama with the embedded model's tokenizer (vocab 49152): real tokenization, chat template and
# grammars, generation ~100x cheaper than the 135M model; a 512-token context bounds every request.
SERVER_FLAGS = ("--load-format", "dummy", "--context-length", str(CONTEXT_LENGTH), "--max-total-tokens", "8192")
CALL_TIMEOUT_S = 60.0  # one call; a reply that takes longer is a hang


def tiny_model_dir(directory: str) -> str:
    """Write the tiny model's config and the embedded model's tokenizer files into ``directory``."""
    from radixlm.models.embedded import embedded_model_path

    source = embedded_model_path()
    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)
    config.update(TINY_CONFIG)
    config.pop("_model_name_or_path", None)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), directory)
    return directory


class FuzzServer:
    """``radixlm serve`` on the tiny model in a subprocess, its log in a file (a pipe nobody reads would fill up with
    the tracebacks a fuzz run can provoke, and block the server)."""

    def __init__(self, model_dir: str, *flags: str, startup_timeout: float = 180.0):
        import socket
        import subprocess
        import sys
        import tempfile

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = tempfile.NamedTemporaryFile("w+", prefix="radixlm-fuzz-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "radixlm.serve", "--port", str(self.port), "--random-seed", "0",
               "--log-level", "warning", "--model-path", model_dir, *SERVER_FLAGS, *flags]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()}")
            try:
                if call(self.port, Case("GET", "/health", None, None, "startup"), 5).status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server did not become healthy in time: {self.output()}")

    def output(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


# ---------------------------------------------------------------------------------------------------- calls, checks
@dataclass
class Reply:
    status: int
    content_type: str
    body: bytes


def call(port: int, case: Case, timeout: float = CALL_TIMEOUT_S) -> Reply:
    """Send ``case``; the whole reply (a stream to its end) within ``timeout`` or ``TimeoutError``."""
    deadline = time.monotonic() + timeout
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {} if case.content_type is None else {"Content-Type": case.content_type}
        conn.request(case.method, case.path, body=case.body, headers=headers)
        resp = conn.getresponse()
        chunks = []
        while chunk := resp.read1(65536) if hasattr(resp, "read1") else resp.read():
            chunks.append(chunk)
            if time.monotonic() > deadline:
                raise TimeoutError(f"no end of the reply after {timeout} s")
        return Reply(resp.status, resp.getheader("content-type") or "", b"".join(chunks))
    except TimeoutError as e:
        raise TimeoutError(f"no reply within {timeout} s") from e
    finally:
        conn.close()


class Violation(AssertionError):
    pass


def strict_json(data: bytes | str) -> Any:
    """Parse as a strict client does: ``NaN``/``Infinity`` are not JSON (Python's json would take them)."""

    def reject(token: str) -> Any:
        raise ValueError(f"{token} is not JSON")

    return json.loads(data, parse_constant=reject)


def check(case: Case, reply: Reply) -> None:
    """The invariants of one reply (raises ``Violation``): no 5xx (every fuzz input is a client's), a 4xx is an
    OpenAI error object, a 2xx is strict JSON of the route's shape (every chunk of a stream too, ending in
    ``[DONE]``) whose generations finished by a stop or the length: calls come one at a time and nobody aborts
    them, so an ``abort`` is the server giving up on a request it had accepted."""
    where = f"{case.show()} -> {reply.status} {reply.body[:400]!r}"
    if reply.status >= 500:
        raise Violation(f"server error for a client's input: {where}")
    if reply.status >= 400:
        try:
            err = strict_json(reply.body)["error"]
            ok = (isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
                  and (err["param"] is None or isinstance(err["param"], str)) and err["code"] == reply.status)
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise Violation(f"a {reply.status} that is not an OpenAI error object: {where}")
        return
    if reply.status != 200:
        raise Violation(f"unexpected status: {where}")
    if reply.content_type.startswith("text/event-stream"):
        events = [line[len("data: "):] for line in reply.body.decode().split("\n") if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            raise Violation(f"a stream that does not end in [DONE]: {where}")
        for event in events[:-1]:
            try:
                chunk = strict_json(event)
            except ValueError as e:
                raise Violation(f"a stream chunk that is not JSON ({e}): {where}") from None
            _shape(case, chunk, where, chunk=True)
        return
    try:
        payload = strict_json(reply.body)
    except ValueError:
        if case.path == "/metrics":
            return
        raise Violation(f"a 200 that is not JSON: {where}") from None
    _shape(case, payload, where, chunk=False)


def _shape(case: Case, out: Any, where: str, chunk: bool) -> None:
    problem = SHAPES.get(case.path, lambda out, chunk: None)(out, chunk)
    if problem:
        raise Violation(f"a 200 of the wrong shape ({problem}): {where}")


def _chat(out: Any, chunk: bool) -> str | None:
    if out.get("object") != ("chat.completion.chunk" if chunk else "chat.completion"):
        return "object"
    for c in out["choices"]:
        if chunk:
            if not isinstance(c["delta"], dict):
                return "delta"
        elif c["message"]["role"] != "assistant" or not isinstance(c["message"]["content"], (str, type(None))):
            return "message"
        if c["finish_reason"] not in (None, "stop", "length", "tool_calls") or (
                not chunk and c["finish_reason"] is None):
            return "finish_reason"
    if not chunk and not out["choices"]:
        return "no choices"
    return _usage(out, chunk)


def _completion(out: Any, chunk: bool) -> str | None:
    if out.get("object") != "text_completion":
        return "object"
    for c in out["choices"]:
        if not isinstance(c["text"], str) or not isinstance(c["index"], int):
            return "choice"
        if c["finish_reason"] not in (None, "stop", "length"):
            return "finish_reason"
    return _usage(out, chunk)


def _usage(out: Any, chunk: bool) -> str | None:
    usage = out.get("usage")
    if usage is None:
        return None if chunk else "usage"
    if usage["total_tokens"] != usage["prompt_tokens"] + usage["completion_tokens"]:
        return "usage"
    return None


def _generate(out: Any, chunk: bool) -> str | None:
    for item in (out if isinstance(out, list) else [out]):
        if not isinstance(item.get("text"), str) or not isinstance(item.get("meta_info"), dict):
            return "text/meta_info"
        if not isinstance(item.get("output_ids"), list):
            return "output_ids"
        if (item["meta_info"].get("finish_reason") or {}).get("type") not in (None, "stop", "length"):
            return "finish_reason"
    return None


SHAPES = {
    "/v1/chat/completions": _chat,
    "/v1/completions": _completion,
    "/generate": _generate,
    "/v1/tokenize": lambda out, chunk: None if (isinstance(out["tokens"], list) and out["count"] == len(out["tokens"])
                                                ) else "tokens",
    "/v1/detokenize": lambda out, chunk: None if isinstance(out["text"], str) else "text",
    "/abort_request": lambda out, chunk: None if out == {} else "not {}",
    "/health": lambda out, chunk: None if out == {} else "not {}",
    "/v1/models": lambda out, chunk: None if out["data"] and out["object"] == "list" else "data",
}


def assert_idle(port: int, timeout: float = 60.0) -> dict[str, Any]:
    """After a run: ``/health`` is 200, no request runs or waits, and every KV slot is free or cached."""
    state: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = call(port, Case("GET", "/health", None, None, "after"))
        if health.status != 200:
            raise Violation(f"/health is {health.status} after the run: {health.body!r}")
        info = json.loads(call(port, Case("GET", "/get_server_info", None, None, "after")).body)
        state = info["internal_states"][0]
        if (state["num_running_reqs"] == 0 and state["num_waiting_reqs"] == 0 and state["protected_kv_tokens"] == 0
                and state["available_kv_tokens"] + state["cached_kv_tokens"] == state["max_total_num_tokens"]):
            return state
        time.sleep(0.2)
    raise Violation(f"the server is not idle after the run: {state}")

