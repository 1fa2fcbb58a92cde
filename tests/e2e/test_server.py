"""The HTTP server end to end: the ``openai`` client and SGLang's native API against a live ``radixlm serve``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time

import openai
import pytest

from server_harness import LiveServer

PROMPTS = ["The capital of France is", "Water boils at", "def fibonacci(n):", "Once upon a time",
           "The largest planet is", "Roses are red,", "import numpy as", "My favourite colour is"]


@pytest.fixture(scope="module")
def server():
    s = LiveServer("--max-total-tokens", "16384")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, content: str, **kwargs):
    return client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}], **kwargs)


# ---------------------------------------------------------------------------------------------------- OpenAI API
def test_chat_knows_paris(client):
    out = chat(client, "What is the capital of France?", temperature=0, max_tokens=24)
    choice = out.choices[0]
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens > 0 and out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_models(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct"]
    status, info = server.request("GET", "/get_model_info")
    assert status == 200 and info["model_path"].endswith("SmolLM2-135M-Instruct") and info["is_generation"]


def test_chat_stream_equals_non_stream(client):
    ref = chat(client, "Name three fruits.", temperature=0, max_tokens=20)
    chunks = list(chat(client, "Name three fruits.", temperature=0, max_tokens=20, stream=True,
                       stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [ref.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ref.usage.completion_tokens


def test_completion_stream_equals_non_stream_and_echo(client):
    ref = client.completions.create(model="m", prompt="The capital of France is", max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model="m", prompt="The capital of France is", max_tokens=12,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == ref.choices[0].text
    echo = client.completions.create(model="m", prompt="The capital of France is", max_tokens=12, temperature=0,
                                     echo=True)
    assert echo.choices[0].text == "The capital of France is" + ref.choices[0].text


def test_completions_prompt_forms(client, server):
    tokens = server.request("POST", "/v1/tokenize", {"prompt": "The capital of France is"})[1]["tokens"]
    by_text = client.completions.create(model="m", prompt="The capital of France is", max_tokens=6, temperature=0)
    by_ids = client.completions.create(model="m", prompt=tokens, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    batch = client.completions.create(model="m", prompt=["Water boils at", "The capital of France is"],
                                      max_tokens=6, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[1].text == by_text.choices[0].text
    id_batch = client.completions.create(model="m", prompt=[tokens, tokens[:3]], max_tokens=4, temperature=0)
    assert len(id_batch.choices) == 2


def test_n_seed_and_sampling_extras(client):
    out = chat(client, "Tell me a word.", n=2, temperature=1.0, seed=7, max_tokens=8,
               extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1})
    again = chat(client, "Tell me a word.", n=2, temperature=1.0, seed=7, max_tokens=8,
                 extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1})
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.message.content for c in out.choices] == [c.message.content for c in again.choices]
    forced = chat(client, "Hi", max_tokens=5, extra_body={"ignore_eos": True, "min_tokens": 5})
    assert forced.usage.completion_tokens == 5 and forced.choices[0].finish_reason == "length"


def test_logprobs(client):
    out = chat(client, "Say yes.", temperature=0, max_tokens=5, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.logprob - 1e-5  # greedy picks the top token
    comp = client.completions.create(model="m", prompt="One, two, three,", max_tokens=4, temperature=0, logprobs=2,
                                     echo=True)
    lp = comp.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert all(len(t) <= 2 for t in lp.top_logprobs[1:])


def test_stop_strings_and_matched_stop(client, server):
    ref = client.completions.create(model="m", prompt="1, 2, 3, 4,", max_tokens=16, temperature=0)
    text = ref.choices[0].text
    assert " 6" in text, text
    stopped = client.completions.create(model="m", prompt="1, 2, 3, 4,", max_tokens=16, temperature=0, stop=[" 6"])
    assert stopped.choices[0].text == text[: text.index(" 6")] and stopped.choices[0].finish_reason == "stop"
    assert stopped.model_extra is not None
    raw = server.request("POST", "/v1/completions", {"prompt": "1, 2, 3, 4,", "max_tokens": 16, "temperature": 0,
                                                     "stop": " 6"})[1]
    assert raw["choices"][0]["matched_stop"] == " 6"
    kept = server.request("POST", "/v1/completions", {"prompt": "1, 2, 3, 4,", "max_tokens": 16, "temperature": 0,
                                                      "stop": " 6", "no_stop_trim": True})[1]
    assert kept["choices"][0]["text"] == text[: text.index(" 6") + 2]


def test_cached_tokens_in_usage(client):
    system = "You are a helpful assistant who answers every question about geography in one sentence. " * 2
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Where is Peru?"}]
    client.chat.completions.create(model="m", messages=messages, max_tokens=2)
    messages[1]["content"] = "Where is Chad?"
    out = client.chat.completions.create(model="m", messages=messages, max_tokens=2)
    assert out.usage.prompt_tokens_details.cached_tokens >= 30


# ---------------------------------------------------------------------------------------------------- native API
def test_generate_single_batch_and_stream(server):
    status, single = server.request("POST", "/generate", {"text": "The capital of France is",
                                                           "sampling_params": {"max_new_tokens": 8, "temperature": 0}})
    assert status == 200 and " Paris" in single["text"]
    meta = single["meta_info"]
    assert meta["completion_tokens"] == len(single["output_ids"]) and meta["finish_reason"]["type"] == "length"
    status, batch = server.request("POST", "/generate", {"text": ["Water boils at", "The capital of France is"],
                                                          "sampling_params": {"max_new_tokens": 8, "temperature": 0}})
    assert status == 200 and batch[1]["text"] == single["text"]
    status, stream = server.request("POST", "/generate", {"text": "The capital of France is", "stream": True,
                                                           "sampling_params": {"max_new_tokens": 8, "temperature": 0}})
    lines = [line[len("data: "):] for line in stream.split("\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    assert chunks[-1]["text"] == single["text"] and chunks[-1]["output_ids"] == single["output_ids"]
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])


def test_generate_logprobs_and_rid(server):
    status, out = server.request("POST", "/generate", {
        "input_ids": [1, 504, 3575, 282, 4649, 314], "rid": "my-request", "return_logprob": True,
        "logprob_start_len": 0, "top_logprobs_num": 2, "sampling_params": {"max_new_tokens": 3, "temperature": 0}})
    assert status == 200, out
    meta = out["meta_info"]
    assert meta["id"] == "my-request"
    assert len(meta["output_token_logprobs"]) == 3 and len(meta["input_token_logprobs"]) == 6
    assert meta["input_token_logprobs"][0][0] is None


def test_generate_returns_hidden_states_on_request(server):
    status, out = server.request("POST", "/generate", {
        "input_ids": [1, 504, 3575, 282, 4649, 314], "return_hidden_states": True,
        "sampling_params": {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True}})
    assert status == 200, out
    hidden = out["meta_info"]["hidden_states"]
    assert len(hidden) == 3 and all(len(h) == 576 for h in hidden)  # SmolLM2-135M's hidden size


def test_batch_of_shared_prefix_prompts_completes(server):
    prefix = list(range(1000, 1064))
    prompts = [prefix + [2000 + i, 3000 + i] for i in range(120)]
    status, outs = server.request("POST", "/generate", {
        "input_ids": prompts, "sampling_params": {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}},
        timeout=600)
    assert status == 200 and len(outs) == 120
    assert all(o["meta_info"]["completion_tokens"] == 4 for o in outs)
    assert sum(o["meta_info"]["cached_tokens"] >= 64 for o in outs) >= 100


def test_64_concurrent_streams(server):
    refs = {}
    for p in PROMPTS:
        status, out = server.request("POST", "/v1/completions", {"prompt": p, "max_tokens": 12, "temperature": 0})
        refs[p] = out["choices"][0]["text"]

    async def one(aclient, prompt: str) -> str:
        stream = await aclient.completions.create(model="m", prompt=prompt, max_tokens=12, temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream])

    async def run_all() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=300)
        try:
            return await asyncio.gather(*(one(aclient, PROMPTS[i % len(PROMPTS)]) for i in range(64)))
        finally:
            await aclient.close()

    texts = asyncio.run(run_all())
    assert texts == [refs[PROMPTS[i % len(PROMPTS)]] for i in range(64)]


def test_admin_routes(server):
    assert server.request("GET", "/health")[0] == 200
    assert server.request("GET", "/health_generate")[0] == 200
    info = server.server_info()
    state = info["internal_states"][0]
    assert info["port"] == server.port and "api_key" not in info
    assert {"num_running_reqs", "num_waiting_reqs", "available_kv_tokens", "cached_kv_tokens"} <= set(state)
    status, _ = server.request("POST", "/flush_cache")
    assert status == 200
    state = server.server_info()["internal_states"][0]
    assert state["cached_kv_tokens"] == 0 and state["available_kv_tokens"] == state["max_total_num_tokens"]
    status, tok = server.request("POST", "/v1/tokenize", {"prompt": "hello world", "add_special_tokens": False})
    assert status == 200 and tok["count"] == len(tok["tokens"])
    assert server.request("POST", "/v1/detokenize", {"tokens": tok["tokens"]})[1]["text"] == "hello world"


# ---------------------------------------------------------------------------------------------------- bad input
LONG = "word " * 9000
BAD_INPUTS = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens",
     "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}, "max_tokens",
     "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": -0.5}, "temperature",
     "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p", "top_p"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_p": 1.5}, "top_p", "top_p"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 0}, "n", "n"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "role", "messages.0.role"),
    ("/v1/chat/completions", {"messages": []}, "messages", "messages"),
    ("/v1/chat/completions", {"model": "m"}, "messages", "messages"),
    ("/v1/chat/completions", {"messages": "hello"}, "messages", "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}, "max_tokens",
     "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000},
     "context length", "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, "context length", "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"99999999": 5}},
     "logit_bias", "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, "logprobs",
     "top_logprobs"),
    ("/v1/completions", {"prompt": [1, 2, 99999999]}, "token ids", "prompt"),
    ("/v1/completions", {"prompt": [[]]}, "empty", "prompt"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, "presence_penalty", "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids", "stop_token_ids"),
    ("/generate", {"text": "x", "sampling_params": {"max_new_token": 3}}, "max_new_token", "max_new_token"),
    ("/generate", {"text": "x", "sampling_params": {"temperature": -1}}, "temperature", "temperature"),
    ("/generate", {"input_ids": [1, 2, 999999]}, "token ids", "input_ids"),
    ("/generate", {}, "prompt", None),
    ("/v1/detokenize", {"tokens": [-3]}, "tokens", "tokens"),
]


@pytest.mark.parametrize("path,body,needle,param", BAD_INPUTS, ids=[f"{p}:{n}" for p, _, n, _ in BAD_INPUTS])
def test_bad_input_is_400_with_a_useful_message(server, path, body, needle, param):
    """A 400 whose message explains and whose ``param`` names the request's field (where one is to blame)."""
    status, out = server.request("POST", path, body)
    assert status == 400, out
    err = out["error"]
    assert needle.lower() in err["message"].lower(), err
    assert err["type"] == "invalid_request_error" and err["code"] == 400 and err["param"] == param, err


def test_malformed_json_and_server_stays_healthy(server):
    status, out = server.request("POST", "/v1/chat/completions", raw=b'{"messages": [')
    assert status == 400 and "json" in out["error"]["message"].lower()
    assert server.request("GET", "/nope")[0] == 404
    assert server.request("GET", "/health_generate")[0] == 200
    state = server.server_info()["internal_states"][0]
    assert state["num_running_reqs"] == 0 and state["protected_kv_tokens"] == 0


# ---------------------------------------------------------------------------------------------------- disconnects
def _wait_idle(server, timeout: float = 30) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = server.server_info()["internal_states"][0]
        if state["num_running_reqs"] == 0 and state["num_waiting_reqs"] == 0:
            return state
        time.sleep(0.2)
    raise AssertionError(f"requests still running: {state}")


def _post_raw(server, path: str, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_frees_memory(server, stream):
    body = {"prompt": "Count forever:", "max_tokens": 4000, "temperature": 0, "ignore_eos": True, "stream": stream}
    sock = _post_raw(server, "/v1/completions", body)
    deadline = time.time() + 30
    while server.server_info()["internal_states"][0]["num_running_reqs"] == 0:
        assert time.time() < deadline
        time.sleep(0.1)
    if stream:
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    sock.close()
    state = _wait_idle(server)
    assert state["protected_kv_tokens"] == 0
    assert state["available_kv_tokens"] + state["cached_kv_tokens"] == state["max_total_num_tokens"]


# ---------------------------------------------------------------------------------------------------- auth, shutdown
# (engine failures, the drain and the limits: test_operations.py)
def test_api_key_and_clean_sigterm():
    s = LiveServer("--max-total-tokens", "2048", api_key="sekret")
    try:
        assert s.request("GET", "/health", auth=False)[0] == 200
        status, out = s.request("GET", "/v1/models", auth=False)
        assert status == 401 and "API key" in out["error"]["message"]
        assert s.request("POST", "/generate", {"text": "x"}, headers={"Authorization": "Bearer wrong"},
                         auth=False)[0] == 401
        ok = openai.OpenAI(base_url=s.base + "/v1", api_key="sekret", max_retries=0)
        assert ok.completions.create(model="m", prompt="Hi", max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.base + "/v1", api_key="nope", max_retries=0).models.list()
        pids = s.server_info()["scheduler_pids"]
    finally:
        code = s.stop(signal.SIGTERM)
    assert code == 0
    for pid in pids:  # no orphaned scheduler
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_abort_request_by_rid(server):
    import threading

    box = {}

    def long_request():
        box["out"] = server.request("POST", "/generate", {
            "text": "Count:", "rid": "to-abort",
            "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True, "temperature": 0}})

    worker = threading.Thread(target=long_request)
    worker.start()
    deadline = time.time() + 30
    while server.server_info()["internal_states"][0]["num_running_reqs"] == 0:
        assert time.time() < deadline
        time.sleep(0.1)
    assert server.request("POST", "/abort_request", {"rid": "to-abort"})[0] == 200
    worker.join(timeout=60)
    status, out = box["out"]
    assert status == 200 and out["meta_info"]["id"] == "to-abort"
    assert out["meta_info"]["finish_reason"]["type"] == "abort" and out["meta_info"]["completion_tokens"] < 4000
    assert server.request("POST", "/abort_request", {})[0] == 400
    _wait_idle(server)
