"""SGLang's own router (``sglang-router``, the Rust package, launched as ``python -m sglang_router.launch_router``)
in front of a real radixlm worker of the embedded model: it registers them (health, ``/server_info``,
``/model_info``: the model id is the workers' served name), reads their load (``/get_load``), and passes the OpenAI
API (streamed and not), native ``/generate`` (text and input_ids, streamed and not) and ``/flush_cache`` through with
the greedy answers the worker gives directly.  Both hold the same API key: the router asks it of clients and sends
it on its own calls to the worker.  One worker: what is checked is the worker side of the protocol
(how the router spreads requests over several is its own business), and a second worker would double the module's
startup on a CPU.  The other direction, ``radixlm router`` in front of radixlm workers:
test_router_serving.py.

sglang-router is a test dependency (pyproject's ``test`` extra): where it is not installed the module is skipped,
except under CI (``CI`` set), where that is an error."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

import openai
import pytest

from tests.e2e.server_harness import LiveServer, free_port

if importlib.util.find_spec("sglang_router") is None:
    if os.environ.get("CI"):
        raise ImportError("sglang-router is not installed: CI installs the test extra (pip install -e '.[test]')")
    pytest.skip("sglang-router is not installed (pip install -e '.[test]')", allow_module_level=True)

ROUTER_READY_TIMEOUT_S = 60
KEY = "sgr-key"
CHAT = {"model": "any", "messages": [{"role": "user", "content": "Name three colors."}], "max_tokens": 6,
        "temperature": 0}


def http(base: str, method: str, path: str, body: Any = None, timeout: float = 120, key: str | None = KEY
         ) -> tuple[int, str]:
    """(status, body text); the JSON content type sglang-router requires of a body."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def get_json(base: str, method: str, path: str, body: Any = None) -> Any:
    status, text = http(base, method, path, body)
    assert status == 200, (path, status, text)
    return json.loads(text)


@pytest.fixture(scope="module")
def workers():
    server = LiveServer("--max-total-tokens", "4096", api_key=KEY)
    yield [server]
    assert server.stop() == 0


@pytest.fixture(scope="module")
def router(workers):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: nobody reads it until the end
        proc = subprocess.Popen([sys.executable, "-m", "sglang_router.launch_router", "--worker-urls",
                                 *[w.base for w in workers], "--policy", "cache_aware", "--host", "127.0.0.1",
                                 "--port", str(port), "--api-key", KEY, "--log-level", "warn",
                                 "--shutdown-grace-period-secs", "5"],
                                stdout=log, stderr=subprocess.STDOUT)

        def output() -> str:
            log.seek(0)
            return log.read()[-4000:]

        deadline = time.time() + ROUTER_READY_TIMEOUT_S
        while True:  # ready: every worker registered and healthy
            assert proc.poll() is None, f"sglang-router exited with {proc.returncode}:\n{output()}"
            try:
                status, text = http(base, "GET", "/readiness", timeout=5)
                if status == 200 and json.loads(text)["healthy_workers"] == len(workers):
                    break
            except OSError:
                pass
            assert time.time() < deadline, f"sglang-router did not get the workers ready:\n{output()}"
            time.sleep(0.3)
        yield base
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_it_registers_the_workers_by_their_metadata(workers, router) -> None:
    registered = get_json(router, "GET", "/workers")["workers"]
    name = get_json(workers[0].base, "GET", "/model_info")["served_model_name"]
    assert sorted(w["url"] for w in registered) == sorted(w.base for w in workers)
    assert all(w["is_healthy"] and w["model_id"] == name for w in registered)
    direct = get_json(workers[0].base, "GET", "/v1/models")["data"]
    assert [m["id"] for m in get_json(router, "GET", "/v1/models")["data"]] == [m["id"] for m in direct] == [name]
    # its load query: every worker's /get_load (one DP rank each), idle
    assert get_json(workers[0].base, "GET", "/get_load") == [
        {"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}]
    loads = get_json(router, "GET", "/get_loads")["workers"]
    assert sorted((entry["worker"], entry["load"]) for entry in loads) == sorted((w.base, 0) for w in workers)


def test_the_openai_api_passes_through(workers, router) -> None:
    direct = openai.OpenAI(base_url=workers[0].base + "/v1", api_key=KEY, max_retries=0, timeout=120)
    routed = openai.OpenAI(base_url=router + "/v1", api_key=KEY, max_retries=0, timeout=120)
    expected = direct.chat.completions.create(**CHAT).choices[0].message.content
    assert expected
    assert routed.chat.completions.create(**CHAT).choices[0].message.content == expected
    streamed = "".join(c.choices[0].delta.content or "" for c in routed.chat.completions.create(stream=True, **CHAT)
                       if c.choices)
    assert streamed == expected
    kw = {"model": "any", "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0}
    expected = direct.completions.create(**kw).choices[0].text
    assert routed.completions.create(**kw).choices[0].text == expected
    assert "".join(c.choices[0].text for c in routed.completions.create(stream=True, **kw) if c.choices) == expected
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=router + "/v1", api_key="wrong", max_retries=0).chat.completions.create(**CHAT)


def test_native_generate_passes_through(workers, router) -> None:
    for body in ({"text": "The capital of France is"}, {"input_ids": [504, 3575, 282, 4649, 314]}):
        body = {**body, "sampling_params": {"max_new_tokens": 5, "temperature": 0}}
        expected = get_json(workers[0].base, "POST", "/generate", body)
        routed = get_json(router, "POST", "/generate", body)
        assert (routed["text"], routed["output_ids"]) == (expected["text"], expected["output_ids"])
        status, text = http(router, "POST", "/generate", {**body, "stream": True})
        assert status == 200
        events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert (last["text"], last["output_ids"]) == (expected["text"], expected["output_ids"])


def test_flush_cache_fans_out(workers, router) -> None:
    get_json(router, "POST", "/generate", {"text": "A prompt to cache", "sampling_params": {"max_new_tokens": 1}})
    reply = get_json(router, "POST", "/flush_cache")
    assert (reply["status"], reply["workers_flushed"]) == ("success", len(workers))
    for w in workers:
        state = w.server_info()["internal_states"][0]
        assert state["cached_kv_tokens"] == 0 and state["available_kv_tokens"] == state["max_total_num_tokens"]
