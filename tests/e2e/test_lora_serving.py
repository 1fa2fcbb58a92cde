"""LoRA adapters through a live server (CPU, the embedded model): OpenAI ``model: "<base>:<adapter>"`` and native
``lora_path`` (one per prompt in a batch), ``/v1/models``, live ``/load_lora_adapter`` and ``/unload_lora_adapter``
(an unload waits for the adapter's requests in flight), and the 400s of bad adapters, unknown names and unloaded
ones, after which the server still serves.  Adapters are built with peft in setup (random A and B)."""

from __future__ import annotations

import os
import threading
import time

import openai
import pytest

from tests.lora_helpers import build_peft_adapter
from server_harness import LiveServer

BASE = "smol"
PROMPTS = ["The capital of France is", "List three colors:", "def fibonacci(n):"]
GREEDY = {"temperature": 0.0, "max_new_tokens": 12}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, embedded_hf_model) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    specs = {  # name -> (rank, target modules, seed, spread of A and B)
        "a": (8, ["q_proj", "v_proj", "o_proj"], 1, 0.05),
        "b": (4, ["k_proj", "gate_proj", "down_proj"], 2, 0.05),
        "c": (8, ["q_proj", "up_proj"], 3, 0.1),
    }
    paths = {}
    for name, (rank, targets, seed, std) in specs.items():
        paths[name] = str(root / name)
        build_peft_adapter(embedded_hf_model, paths[name], r=rank, alpha=2 * rank, rslora=False, targets=targets,
                           layers=None, seed=seed, std=std)
    paths["empty"] = str(root / "empty")
    os.makedirs(paths["empty"])
    return paths


@pytest.fixture(scope="module")
def server(adapters):
    s = LiveServer("--served-model-name", BASE, "--enable-lora", "--lora-paths", f"a={adapters['a']}",
                   f"b={adapters['b']}", "--max-loras-per-batch", "2", "--max-lora-rank", "8")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=120)


def generate(server: LiveServer, text, lora_path=None, params=GREEDY) -> tuple[int, object]:
    body = {"text": text, "sampling_params": params}
    if lora_path is not None:
        body["lora_path"] = lora_path
    return server.request("POST", "/generate", body)


def generated_text(server: LiveServer, text: str, lora_path=None) -> str:
    status, out = generate(server, text, lora_path)
    assert status == 200, out
    return out["text"]


def test_models_list_the_base_and_each_adapter(server, adapters) -> None:
    status, body = server.request("GET", "/v1/models")
    assert status == 200
    assert [(m["id"], m["parent"]) for m in body["data"]] == [(BASE, None), (f"{BASE}:a", BASE), (f"{BASE}:b", BASE)]
    assert [m["root"] for m in body["data"][1:]] == [adapters["a"], adapters["b"]]


def test_openai_adapter_changes_the_output_and_matches_generate(server, client) -> None:
    prompt = PROMPTS[0]
    base = client.completions.create(model=BASE, prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    reply = client.completions.create(model=f"{BASE}:a", prompt=prompt, max_tokens=12, temperature=0)
    with_a = reply.choices[0].text
    assert reply.model == f"{BASE}:a"
    assert with_a != base
    assert with_a == generated_text(server, prompt, "a")
    assert base == generated_text(server, prompt)
    chat = client.chat.completions.create(model=f"{BASE}:b", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=8, temperature=0)
    chat_base = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=8, temperature=0)
    assert chat.choices[0].message.content != chat_base.choices[0].message.content


def test_mixed_adapter_batch_equals_each_prompt_alone(server) -> None:
    loras = [None, "a", "b"]
    status, outs = generate(server, PROMPTS, loras)
    assert status == 200, outs
    assert [o["text"] for o in outs] == [generated_text(server, p, lora) for p, lora in zip(PROMPTS, loras)]


def test_unknown_adapters_and_bad_adapter_dirs_are_400s(server, client, adapters) -> None:
    status, body = generate(server, PROMPTS[0], "nope")
    assert status == 400 and "unknown LoRA adapter 'nope'" in body["error"]["message"]
    assert body["error"]["param"] == "lora_path"
    status, body = generate(server, PROMPTS[:2], ["a"])
    assert status == 400 and "1 lora_path entries for 2 prompts" in body["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="unknown LoRA adapter 'nope'") as exc:
        client.completions.create(model=f"{BASE}:nope", prompt="Hi", max_tokens=2)
    assert exc.value.body["param"] == "model"
    status, body = server.request("POST", "/load_lora_adapter", {"lora_name": "bad", "lora_path": adapters["empty"]})
    assert status == 400 and adapters["empty"] in body["error"]["message"], body
    status, body = server.request("POST", "/load_lora_adapter", {"lora_name": "a", "lora_path": adapters["c"]})
    assert status == 400 and "'a' is already loaded" in body["error"]["message"]
    status, body = server.request("POST", "/unload_lora_adapter", {"lora_name": "nope"})
    assert status == 400 and "'nope' is not loaded" in body["error"]["message"]
    assert generated_text(server, PROMPTS[1], "b") and generated_text(server, PROMPTS[1])  # still serving


def test_live_load_use_and_unload(server, adapters) -> None:
    base = generated_text(server, PROMPTS[0])
    status, body = server.request("POST", "/load_lora_adapter", {"lora_name": "c", "lora_path": adapters["c"]})
    assert status == 200 and (body["success"], body["rank"], body["target_modules"]) == (True, 8, ["q_proj",
                                                                                                   "up_proj"])
    with_c = generated_text(server, PROMPTS[0], "c")
    assert with_c != base
    status, body = server.request("POST", "/unload_lora_adapter", {"lora_name": "c"})
    assert status == 200 and body["success"]
    status, body = generate(server, PROMPTS[0], "c")
    assert status == 400 and "unknown LoRA adapter 'c'" in body["error"]["message"]
    assert generated_text(server, PROMPTS[0]) == base
    # Loaded again under the same name: the same outputs (no KV cached under the unloaded one is reused)
    assert server.request("POST", "/load_lora_adapter", {"lora_name": "c", "lora_path": adapters["c"]})[0] == 200
    assert generated_text(server, PROMPTS[0], "c") == with_c
    assert server.request("POST", "/unload_lora_adapter", {"lora_name": "c"})[0] == 200


def test_unload_waits_for_the_adapters_requests_in_flight(server, adapters) -> None:
    assert server.request("POST", "/load_lora_adapter", {"lora_name": "d", "lora_path": adapters["c"]})[0] == 200
    long_params = {"temperature": 0.0, "max_new_tokens": 64, "ignore_eos": True}
    events: dict[str, float] = {}
    results: dict[str, object] = {}

    def long_request() -> None:
        results["long"] = generate(server, PROMPTS[0], "d", long_params)
        events["long_done"] = time.monotonic()

    def unload() -> None:
        results["unload"] = server.request("POST", "/unload_lora_adapter", {"lora_name": "d"})
        events["unload_done"] = time.monotonic()

    worker = threading.Thread(target=long_request)
    worker.start()
    deadline = time.monotonic() + 30
    while server.server_info()["internal_states"][0]["num_running_reqs"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    unloader = threading.Thread(target=unload)
    unloader.start()
    # The adapter takes no new request once the unload has started (it leaves /v1/models at once)
    while f"{BASE}:d" in [m["id"] for m in server.request("GET", "/v1/models")[1]["data"]]:
        time.sleep(0.01)
    status, body = generate(server, PROMPTS[1], "d")
    refused_at = time.monotonic()
    assert status == 400 and "'d' is being unloaded" in body["error"]["message"]
    worker.join(120)
    unloader.join(120)
    status, out = results["long"]
    assert status == 200 and out["meta_info"]["completion_tokens"] == 64, out
    assert results["unload"][0] == 200, results["unload"]
    assert refused_at < events["long_done"] <= events["unload_done"]
    assert generated_text(server, PROMPTS[1])
