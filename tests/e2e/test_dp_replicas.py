"""``radixlm serve --dp-size 2`` of the embedded model on CPU end to end: each replica a plain server with the flags
given; the greedy answers through the public port equal a single worker's (chat, streamed chat, /generate);
requests reach both replicas and a shared prefix sticks to one (cache-aware, with the replica's prefix cache hit);
a replica killed is routed around; SIGTERM ends every process of the tree; a replica that cannot start fails the
command with its name and output."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import openai
import pytest

from server_harness import LiveServer, free_port

KEY = "dp-key"
SMALL = ("--max-total-tokens", "1024", "--random-seed", "0")
CHAT = [{"role": "user", "content": "Name three colors."}]
TEXTS = ["The capital of France is", "def fibonacci(n):"]
# Three families of prompts, each a shared prefix (longer than anything sent before) and two tails
FAMILIES = [[f"{topic} " * 8 + tail for tail in ("Tell me more.", "Why?")]
            for topic in ("Tomatoes grow in summer gardens.", "Rivers carry water to the sea.",
                          "Owls hunt small animals at night.")]


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (Linux /proc)."""
    found = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for tid in tids:
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            for child in map(int, f.read().split()):
                found += [child, *children(child)]
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def generate(server: LiveServer, text: str) -> dict:
    status, out = server.request("POST", "/generate", {"text": text, "sampling_params": {
        "max_new_tokens": 6, "temperature": 0}})
    assert status == 200, out
    return out


def chat(server: LiveServer, **kwargs):
    client = openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0, timeout=120)
    return client.chat.completions.create(model="m", messages=CHAT, max_tokens=8, temperature=0, **kwargs)


@pytest.fixture(scope="module")
def server():
    s = LiveServer("--dp-size", "2", *SMALL, "--router-health-check-interval-secs", "0.5", api_key=KEY)
    yield s
    s.stop(signal.SIGKILL)  # only when a test failed before the SIGTERM test


def replica_urls(server: LiveServer) -> list[str]:
    status, listed = server.request("GET", "/list_workers")
    assert status == 200 and listed["policy"] == "cache_aware", listed
    return [w["url"] for w in listed["workers"]]


def direct(url: str) -> LiveServer:
    """A client of one replica, bypassing the router."""
    client = LiveServer.__new__(LiveServer)
    client.base, client.api_key = url, KEY
    return client


def decisions(server: LiveServer) -> dict[str, float]:
    status, text = server.request("GET", "/metrics")
    assert status == 200
    return {m[0]: float(m[1]) for m in re.findall(r'radixlm_router_decisions_total\{worker="([^"]+)"\} (\S+)', text)}


def served_by(server: LiveServer, text: str) -> tuple[str, dict]:
    """The replica the router sent ``text`` to (the one whose decision count grew), and its answer."""
    before = decisions(server)
    out = generate(server, text)
    grew = [w for w, n in decisions(server).items() if n > before.get(w, 0)]
    assert len(grew) == 1, grew
    return grew[0], out


def test_replicas_serve_this_servers_flags(server) -> None:
    """Each replica is a plain server on its own local port with the flags given (its seed + i), key required."""
    infos = []
    for url in replica_urls(server):
        assert direct(url).request("GET", "/v1/models", auth=False)[0] == 401
        status, info = direct(url).request("GET", "/get_server_info")
        assert status == 200, info
        infos.append(info)
    assert [(i["dp_size"], i["dtype"], i["max_total_tokens"], i["random_seed"], i["host"]) for i in infos] == [
        (1, "float32", 1024, 0, "127.0.0.1"), (1, "float32", 1024, 1, "127.0.0.1")]
    assert [f"http://127.0.0.1:{i['port']}" for i in infos] == replica_urls(server)


def test_shared_prefixes_stick_to_a_replica_and_both_replicas_serve(server) -> None:
    urls = sorted(replica_urls(server))
    placed = []
    for family in FAMILIES:
        answers = [served_by(server, text) for text in family]
        assert len({worker for worker, _ in answers}) == 1, answers  # the whole family on one replica
        assert all(out["meta_info"]["cached_tokens"] > 0 for _, out in answers[1:])  # its prefix cache hit
        placed.append(answers[0][0])
    assert sorted(set(placed)) == urls  # new prefixes go to the smaller tree: both replicas serve


@pytest.fixture(scope="module")
def reference(server) -> dict:
    """A single worker's answers: each replica's, asked directly (they agree)."""
    answers = [{"chat": chat(direct(url)).choices[0].message.content,
                "generate": [generate(direct(url), t)["text"] for t in TEXTS]} for url in replica_urls(server)]
    assert answers[0] == answers[1]
    return answers[0]


def test_answers_equal_a_single_worker(server, reference) -> None:
    assert chat(server).choices[0].message.content == reference["chat"]
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(server, stream=True) if c.choices)
    assert streamed == reference["chat"]
    assert [generate(server, t)["text"] for t in TEXTS] == reference["generate"]
    assert server.request("GET", "/v1/models", auth=False)[0] == 401  # the key is required at the public port


def test_a_dead_replica_is_routed_around_and_sigterm_ends_every_process(server, reference) -> None:
    replicas = children(server.proc.pid)
    assert len(replicas) >= 4  # two replica servers, a scheduler process each
    status, listed = server.request("GET", "/list_workers")
    victim_url = listed["workers"][1]["url"]
    port = int(victim_url.rsplit(":", 1)[1])
    victim = next(pid for pid in replicas if f"--port\x00{port}\x00" in open(f"/proc/{pid}/cmdline").read())
    os.killpg(victim, signal.SIGKILL)  # the replica server and its scheduler
    for _ in range(2):  # whichever replica the policy picks, the answers stay right
        assert [generate(server, t)["text"] for t in TEXTS] == reference["generate"]
    deadline = time.time() + 10
    while server.request("GET", "/list_workers")[1]["workers"][1]["healthy"]:
        assert time.time() < deadline
        time.sleep(0.2)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=60) == 1  # drained, but a replica was lost on the way
    assert [pid for pid in replicas if alive(pid)] == []
    log = server.proc.stdout.read()
    assert f"replica 1 ({victim_url}, cpu) was killed by SIGKILL while serving" in log


def test_a_replica_that_cannot_start_fails_the_command() -> None:
    """Named with its output, the other replica stopped, the exit status 1, the public port never served."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "radixlm.serve", "--dp-size", "2", "--port", str(port),
                             "--device", "cpu", "--chat-template", "no-such-template"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    assert re.search(r"replica \d \(http://127\.0\.0\.1:\d+, cpu\) exited with code 1 while starting\.\n"
                     r"Its last output:\n(    .*\n)*"
                     r"    ValueError: --chat-template 'no-such-template' is neither", out), out
    assert "startup failed: stopping the other replicas" in out and "radixlm is serving" not in out
