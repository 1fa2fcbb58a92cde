"""``radixlm router`` (its own process, as launched by the command) in front of one real worker: the OpenAI API
passes through, streamed and not, with the same greedy answers as the worker gives directly; the router's key is
required and forwarded; /flush_cache fans out; a client leaving aborts the worker's request."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import openai
import pytest

from tests.e2e.server_harness import LiveServer, free_port

KEY = "router-key"


@pytest.fixture(scope="module")
def worker():
    s = LiveServer("--max-total-tokens", "4096", api_key=KEY)
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def router(worker):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "radixlm.cli", "router", "--worker-urls", worker.base,
                             "--port", str(port), "--api-key", KEY, "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        assert time.time() < deadline, "the router did not become healthy"
        time.sleep(0.2)
    yield base
    proc.terminate()
    assert proc.wait(timeout=30) in (0, -15)  # uvicorn re-raises the SIGTERM after its graceful shutdown


def test_the_openai_api_passes_through(worker, router) -> None:
    direct = openai.OpenAI(base_url=worker.base + "/v1", api_key=KEY, max_retries=0, timeout=120)
    routed = openai.OpenAI(base_url=router + "/v1", api_key=KEY, max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "Name three colors."}]
    kw = {"model": "m", "messages": messages, "max_tokens": 8, "temperature": 0}
    expected = direct.chat.completions.create(**kw).choices[0].message.content
    assert routed.chat.completions.create(**kw).choices[0].message.content == expected
    streamed = "".join(c.choices[0].delta.content or "" for c in routed.chat.completions.create(stream=True, **kw)
                       if c.choices)
    assert streamed == expected
    assert [m.id for m in routed.models.list().data] == [m.id for m in direct.models.list().data]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=router + "/v1", api_key="wrong", max_retries=0).models.list()


def test_flush_cache_and_metrics(worker, router) -> None:
    request = urllib.request.Request(router + "/flush_cache", method="POST",
                                     headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=60) as r:
        assert r.status == 200
    request = urllib.request.Request(router + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=10) as r:
        metrics = r.read().decode()
    assert f'radixlm_router_worker_healthy{{worker="{worker.base}"}} 1.0' in metrics


def test_a_client_leaving_aborts_the_workers_request(worker, router) -> None:
    """A client that times out before the answer's head: the router cancels the worker's request, which the worker
    aborts (its front end tracks no request afterwards) instead of generating to the end."""
    routed = openai.OpenAI(base_url=router + "/v1", api_key=KEY, max_retries=0, timeout=1.5)
    with pytest.raises(openai.APITimeoutError):
        routed.completions.create(model="m", prompt="Once upon a time", max_tokens=3000, temperature=0,
                                  extra_body={"ignore_eos": True})
    deadline = time.time() + 10
    while worker.request("GET", "/get_server_info")[1]["num_frontend_reqs"] != 0:
        assert time.time() < deadline, "the worker still runs the abandoned request"
        time.sleep(0.1)
