"""The router process's HTTP app (issue #21) against mock workers: tiny Starlette apps served by uvicorn in threads
on free ports, as is the router; a synchronous httpx client plays the user."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from radixlm.router import CacheAwarePolicy, RouterArgs
from radixlm.errors import error_body
from radixlm.router.proxy import routing_text
from radixlm.router.server import _eviction_loop, create_router_app
from radixlm.router.workers import HealthChecks, WorkerSet

SYSTEM = "You are a helpful assistant who answers questions about the weather in great detail. " * 4


class Server:
    """An ASGI app served by uvicorn in a daemon thread on a free port."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="on", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class MockWorker:
    """A worker that answers ``{"worker": name, "path": ...}``, or with ``"stream": true`` an SSE stream of
    ``chunks`` events; ``/health`` answers ``health_status``.  ``fail``: ``"500"`` answers every generating
    request 500, ``"midstream"`` breaks the stream after its first event, ``"short"`` breaks a JSON answer after
    its first bytes (of a declared Content-Length).  The first event of a stream is followed
    by a wait on ``gate`` (set by the test once it holds that event) before the rest.  ``"hold": true`` in a body
    holds the answer until the router drops the connection.  ``aborted``: the paths whose client (the router)
    left before the answer ended, as the mock saw it (a JSON answer held, or a stream cut off)."""

    def __init__(self, name: str, fail: str | None = None, chunks: int = 3) -> None:
        self.name = name
        self.fail = fail
        self.chunks = chunks
        self.health_status = 200
        self.requests: list[tuple[str, Any, dict[str, str]]] = []
        self.other_bodies: list[bytes] = []  # of the routes not generating
        self.gate = threading.Event()
        self.gate_timed_out = False
        self.aborted: list[str] = []

        async def generating(request: Request) -> Response:
            body = await request.json()
            self.requests.append((request.url.path, body, dict(request.headers)))
            if self.fail == "500":
                return JSONResponse(error_body("boom", 500), status_code=500)
            if self.fail == "short":
                return _ShortResponse()
            if body.get("hold"):
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    if await request.is_disconnected():
                        self.aborted.append(request.url.path)
                        break
                    await asyncio.sleep(0.01)
            if body.get("stream"):
                return StreamingResponse(self._events(request.url.path), media_type="text/event-stream")
            return JSONResponse({"worker": self.name, "path": request.url.path})

        async def other(request: Request) -> Response:
            self.requests.append((request.url.path, None, dict(request.headers)))
            self.other_bodies.append(await request.body())
            return JSONResponse({"worker": self.name, "path": request.url.path})

        async def health(request: Request) -> Response:
            return JSONResponse({}, status_code=self.health_status)

        self.server = Server(Starlette(routes=[
            Route("/health", health), Route("/flush_cache", other, methods=["GET", "POST"]),
            Route("/abort_request", other, methods=["POST"]),
            Route("/v1/models", other),
            *(Route(p, generating, methods=["POST"]) for p in ("/generate", "/v1/completions",
                                                                "/v1/chat/completions"))]))
        self.url = self.server.url

    async def _events(self, path: str) -> AsyncIterator[bytes]:
        yield f'data: {{"worker": "{self.name}", "i": 0}}\n\n'.encode()
        if self.fail == "midstream":
            raise RuntimeError("the worker died")
        deadline = time.monotonic() + 5
        try:
            while not self.gate.is_set():
                if time.monotonic() > deadline:
                    self.gate_timed_out = True
                    break
                await asyncio.sleep(0.005)
        except asyncio.CancelledError:  # the client left (Starlette cancels the stream)
            self.aborted.append(path)
            raise
        for i in range(1, self.chunks):
            yield f'data: {{"worker": "{self.name}", "i": {i}}}\n\n'.encode()
        yield b"data: [DONE]\n\n"

    def generated(self) -> int:
        return sum(1 for path, body, _ in self.requests if body is not None)


class _ShortResponse(Response):
    """A JSON answer declaring 100 bytes that breaks after 11 (uvicorn closes the connection)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")]})
        await send({"type": "http.response.body", "body": b'{"worker": ', "more_body": True})
        raise RuntimeError("the worker died")


@contextlib.contextmanager
def router(workers: list[MockWorker] | list[str], **kw: Any) -> Iterator[httpx.Client]:
    """The router over ``workers`` (mocks or URLs) with RouterArgs ``kw`` (``retries``, ``health`` go to the app;
    health checks every minute unless told), and a client of it."""
    app_kw = {k: kw.pop(k) for k in ("retries", "health") if k in kw}
    app_kw.setdefault("health", HealthChecks(interval_secs=60.0))
    urls = tuple(w if isinstance(w, str) else w.url for w in workers)
    server = Server(create_router_app(RouterArgs(worker_urls=urls, **kw), **app_kw))
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            yield client
    finally:
        server.stop()


@pytest.fixture
def two() -> Iterator[list[MockWorker]]:
    workers = [MockWorker("a"), MockWorker("b")]
    yield workers
    for w in workers:
        w.server.stop()


def completion(client: httpx.Client, prompt: str, **kw: Any) -> httpx.Response:
    return client.post("/v1/completions", json={"model": "m", "prompt": prompt, **kw})


def wait_for(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_routing_text() -> None:
    chat = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}]}]}
    assert routing_text("/v1/chat/completions", chat) == "system: be brief\nuser: hi\n"
    assert routing_text("/v1/completions", {"prompt": ["a", "b"]}) == "a\nb"
    assert routing_text("/generate", {"text": "x"}) == "x"
    assert routing_text("/generate", {"input_ids": [1, 22, 3]}) == "1 22 3"
    assert routing_text("/generate", {"input_ids": [[1, 2], [3]]}) == "1 2\n3"
    assert routing_text("/v1/completions", {"prompt": 5}) == ""


def test_routing_text_keys_lora_adapters() -> None:
    """A LoRA adapter's requests route in a namespace of their own (KV is cached per adapter): the same prompt
    under two adapters, or under one and the base model, shares no prefix; base requests route as before."""
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert routing_text("/v1/chat/completions", dict(chat, model="smollm2")) == "user: hi\n"
    assert routing_text("/v1/chat/completions", dict(chat, model="smollm2:french")) == \
        "\0lora:smollm2:french\0user: hi\n"
    assert routing_text("/v1/completions", {"prompt": "a", "model": "m:json"}) == "\0lora:m:json\0a"
    assert routing_text("/generate", {"text": "x", "lora_path": "french"}) == "\0lora:french\0x"
    assert routing_text("/generate", {"text": ["x", "y"], "lora_path": ["french", None]}) == \
        "\0lora:french\n\0x\ny"
    assert routing_text("/generate", {"text": "x", "lora_path": [None]}) == "x"
    french, json_ = (routing_text("/generate", {"text": "same prompt", "lora_path": n}) for n in ("french", "json"))
    assert french[0] == json_[0] == "\0" and french[:6] == json_[:6] and french[6] != json_[6]


def test_cache_aware_sends_a_shared_prefix_to_the_same_worker(two: list[MockWorker]) -> None:
    with router(two, policy="cache_aware") as client:
        first = completion(client, SYSTEM + "Question 1: is it raining?").json()["worker"]
        for i in range(2, 6):
            assert completion(client, SYSTEM + f"Question {i}: sunny later?").json()["worker"] == first
        other = completion(client, "Translate to French: good morning, how are you today my friend?").json()
        assert other["worker"] != first  # no match: the worker with the smaller tree
        chat = {"model": "m", "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "q"}]}
        chat_worker = client.post("/v1/chat/completions", json=chat).json()["worker"]
        chat["messages"][1]["content"] = "another question"
        assert client.post("/v1/chat/completions", json=chat).json()["worker"] == chat_worker


def test_round_robin_alternates_and_generate_passes_through(two: list[MockWorker]) -> None:
    with router(two, policy="round_robin") as client:
        got = [client.post("/generate", json={"text": "same"}).json() for _ in range(4)]
    assert [g["worker"] for g in got] == ["a", "b", "a", "b"]
    assert {g["path"] for g in got} == {"/generate"}
    assert two[0].requests[0][1] == {"text": "same"}


def test_sse_streams_through_unbuffered(two: list[MockWorker]) -> None:
    with router(two, policy="round_robin") as client:
        with client.stream("POST", "/v1/completions", json={"prompt": "p", "stream": True}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            chunks = response.iter_raw()
            first = next(chunks)
            assert b'"i": 0' in first and b'"i": 1' not in first  # the worker holds the rest until the gate opens
            two[0].gate.set()
            rest = b"".join(chunks)
        wait_for(lambda: client.get("/list_workers").json()["workers"][0]["outstanding"] == 0)
    assert not two[0].gate_timed_out
    assert rest.endswith(b"data: [DONE]\n\n") and b'"i": 2' in rest


def test_a_refused_connection_is_retried_on_another_worker(two: list[MockWorker]) -> None:
    with router(two, policy="round_robin") as client:
        assert client.get("/list_workers").json()["workers"][0]["healthy"]
        two[0].server.stop()  # healthy at its last check, now refusing connections
        for _ in range(3):
            assert completion(client, "x").json()["worker"] == "b"
        workers = client.get("/list_workers").json()["workers"]
        assert [w["healthy"] for w in workers] == [False, True]  # taken out until it passes a check
        assert [w["outstanding"] for w in workers] == [0, 0]
        metrics = client.get("/metrics").text
    assert f'radixlm_router_retries_total{{worker="{two[0].url}"}} 1.0' in metrics


def test_a_5xx_is_retried_and_the_last_failure_returned() -> None:
    bad, good = MockWorker("bad", fail="500"), MockWorker("good")
    try:
        with router([bad, good], policy="round_robin") as client:
            assert completion(client, "x").json()["worker"] == "good"
            assert bad.generated() == 1
        with router([bad], policy="round_robin", retries=2) as client:
            response = completion(client, "x")
            assert response.status_code == 500 and response.json()["error"]["message"] == "boom"
    finally:
        bad.server.stop()
        good.server.stop()


def test_a_failure_after_the_first_byte_is_not_retried() -> None:
    dying, other = MockWorker("dying", fail="midstream"), MockWorker("other")
    try:
        with router([dying, other], policy="round_robin") as client:
            response = completion(client, "x", stream=True)
            events = [line[len("data: "):] for line in response.text.split("\n\n") if line]
            assert json.loads(events[0]) == {"worker": "dying", "i": 0}
            assert json.loads(events[1])["error"]["code"] == 502
            assert events[2] == "[DONE]" and len(events) == 3
            assert other.generated() == 0
            wait_for(lambda: client.get("/list_workers").json()["workers"][0]["outstanding"] == 0)
            assert 'radixlm_router_truncated_total' in client.get("/metrics").text
    finally:
        dying.server.stop()
        other.server.stop()


def test_a_json_answer_failing_midway_is_a_502_not_retried() -> None:
    dying, other = MockWorker("dying", fail="short"), MockWorker("other")
    try:
        with router([dying, other], policy="round_robin") as client:
            response = completion(client, "x")
            assert response.status_code == 502 and response.json()["error"]["code"] == 502
            assert other.generated() == 0
            assert [w["outstanding"] for w in client.get("/list_workers").json()["workers"]] == [0, 0]
            assert f'radixlm_router_truncated_total{{worker="{dying.url}"}} 1.0' in client.get("/metrics").text
    finally:
        dying.server.stop()
        other.server.stop()


def test_add_remove_list_workers(two: list[MockWorker]) -> None:
    with router([two[0]], policy="round_robin") as client:
        assert client.post("/add_worker", params={"url": two[1].url}).json() == {"url": two[1].url, "healthy": True}
        assert client.post("/add_worker", params={"url": two[1].url}).status_code == 400
        listed = client.get("/list_workers").json()
        assert [w["url"] for w in listed["workers"]] == [two[0].url, two[1].url]
        assert {completion(client, "x").json()["worker"] for _ in range(2)} == {"a", "b"}
        assert client.post("/remove_worker", params={"url": two[0].url}).status_code == 200
        assert client.post("/remove_worker", params={"url": two[0].url}).status_code == 404
        assert {completion(client, "x").json()["worker"] for _ in range(3)} == {"b"}
        missing = client.post("/add_worker")
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "url"


def test_health_checks_remove_and_restore_a_worker(two: list[MockWorker]) -> None:
    health = HealthChecks(interval_secs=0.05, failure_threshold=1, success_threshold=1)
    with router(two, policy="round_robin", health=health) as client:
        healthy = lambda: [w["healthy"] for w in client.get("/list_workers").json()["workers"]]  # noqa: E731
        assert healthy() == [True, True]
        two[0].health_status = 503
        wait_for(lambda: healthy() == [False, True])
        assert {completion(client, "x").json()["worker"] for _ in range(3)} == {"b"}
        two[1].health_status = 503
        wait_for(lambda: healthy() == [False, False])
        assert client.get("/health").status_code == 503
        assert completion(client, "x").status_code == 503
        two[0].health_status = two[1].health_status = 200
        wait_for(lambda: healthy() == [True, True])
        assert client.get("/health").status_code == 200


def test_health_thresholds_count_consecutive_checks(two: list[MockWorker]) -> None:
    """A new worker joins at its first passing check; a healthy one leaves after --health-failure-threshold
    failed checks in a row (a pass in between restarts the count) and comes back after
    --health-success-threshold passes in a row."""
    async def run() -> list[bool]:
        workers = WorkerSet((two[0].url,), CacheAwarePolicy(RouterArgs()),
                            HealthChecks(timeout_secs=2.0, failure_threshold=3, success_threshold=2))
        seen = []
        async with aiohttp.ClientSession() as session:
            for status in (503, 200, 503, 503, 200, 503, 503, 503, 200, 503, 200, 200, 503):
                two[0].health_status = status
                await workers.check(session, two[0].url)
                seen.append(workers.all()[0].healthy)
        return seen

    assert asyncio.run(run()) == [False, True, True, True, True, True, True, False, False, False, False, True,
                                  True]


def test_a_client_leaving_before_the_answer_aborts_the_workers_request(two: list[MockWorker]) -> None:
    with router(two, policy="round_robin") as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/completions", json={"prompt": "p", "hold": True}, timeout=0.3)
        wait_for(lambda: two[0].aborted == ["/v1/completions"])
        with client.stream("POST", "/v1/completions", json={"prompt": "p", "stream": True}) as response:
            assert b'"i": 0' in next(response.iter_raw())  # the stream started; the client leaves midway
        wait_for(lambda: two[1].aborted == ["/v1/completions"])
        wait_for(lambda: [w["outstanding"] for w in client.get("/list_workers").json()["workers"]] == [0, 0])
        assert completion(client, "x").json()["worker"] == "a"  # both workers still healthy, in turn


def test_flush_cache_fans_out_and_metrics_count(two: list[MockWorker]) -> None:
    with router(two, policy="round_robin") as client:
        answer = client.post("/flush_cache")
        assert answer.status_code == 200
        assert set(answer.json()["workers"]) == {two[0].url, two[1].url}
        assert [w.requests[-1][0] for w in two] == ["/flush_cache", "/flush_cache"]
        assert client.post("/abort_request", json={"rid": "r1"}).status_code == 200
        assert [json.loads(w.other_bodies[-1]) for w in two] == [{"rid": "r1"}, {"rid": "r1"}]
        for _ in range(3):
            completion(client, "x")
        assert client.get("/v1/models").json()["path"] == "/v1/models"
        metrics = client.get("/metrics").text
    assert f'radixlm_router_decisions_total{{worker="{two[0].url}"}} 3.0' in metrics  # 2 + /v1/models
    assert f'radixlm_router_responses_total{{worker="{two[1].url}"}} 1.0' in metrics
    assert f'radixlm_router_worker_healthy{{worker="{two[0].url}"}} 1.0' in metrics
    assert f'radixlm_router_outstanding_requests{{worker="{two[0].url}"}} 0.0' in metrics


def test_api_key_is_required_and_forwarded(two: list[MockWorker]) -> None:
    with router(two, policy="round_robin", api_key="s3cret") as client:
        denied = completion(client, "x")
        assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"
        assert client.get("/list_workers", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert client.get("/health").status_code == 200
        ok = client.post("/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
    assert two[0].requests[-1][2]["authorization"] == "Bearer s3cret"
    assert two[1].generated() == 0


def test_a_bad_request_is_an_openai_400_and_the_router_stays_up(two: list[MockWorker]) -> None:
    with router(two, policy="cache_aware") as client:
        for body in (b"{not json", b"[1, 2]"):
            bad = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            assert bad.status_code == 400
            assert bad.json()["error"]["type"] == "invalid_request_error"
        assert completion(client, "fine").status_code == 200
    assert sum(w.generated() for w in two) == 1


def test_no_worker_is_a_503() -> None:
    with router([], policy="cache_aware") as client:
        response = completion(client, "x")
        assert response.status_code == 503 and response.json()["error"]["type"] == "service_unavailable"


def test_the_eviction_task_cuts_the_trees_in_slices_yielding_between() -> None:
    policy = CacheAwarePolicy(max_tree_size=50)
    for i in range(300):  # 300 distinct branches a worker: more heap pops than one slice
        policy.select(f"{i} {SYSTEM}", {"w0": 0, "w1": 0})
    assert policy.tree.size("w0") > 50
    ticks = 0
    ticks_at_slice: list[int] = []
    evict = policy.evict

    def counted_evict(budget: int | None = None) -> bool:
        ticks_at_slice.append(ticks)
        return evict(budget)

    policy.evict = counted_evict  # type: ignore[method-assign]

    async def run() -> None:
        async def ticker() -> None:  # advances only when the eviction task yields the loop
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        tasks = [asyncio.create_task(_eviction_loop(policy, 0.2)), asyncio.create_task(ticker())]  # one pass
        await asyncio.sleep(0.3)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(run())
    assert policy.tree.size("w0") <= 50 and policy.tree.size("w1") <= 50
    assert len(ticks_at_slice) >= 3  # slices of one pass, the loop running between each two
    assert all(a < b for a, b in zip(ticks_at_slice, ticks_at_slice[1:]))


def test_health_flags_reach_health_checks_and_are_validated() -> None:
    from radixlm.router import launch

    parser = argparse.ArgumentParser()
    launch.add_cli_args(parser)
    assert launch.router_options(parser.parse_args([])).health == HealthChecks(5.0, 5.0, 3, 2)  # SGLang's thresholds
    ns = parser.parse_args(["--health-check-interval-secs", "1", "--health-check-timeout-secs", "0.5",
                            "--health-failure-threshold", "4", "--health-success-threshold", "1"])
    assert launch.router_options(ns).health == HealthChecks(1.0, 0.5, 4, 1)
    serve = argparse.ArgumentParser()
    launch.add_cli_args(serve, launch.SERVE_PREFIX)
    ns = serve.parse_args(["--router-health-failure-threshold", "5"])
    assert launch.router_options(ns, launch.SERVE_PREFIX).health.failure_threshold == 5
    for bad in (["--health-failure-threshold", "0"], ["--health-success-threshold", "0"],
                ["--health-check-timeout-secs", "0"], ["--health-check-interval-secs", "0"]):
        with pytest.raises(ValueError):
            launch.router_options(parser.parse_args(bad))
