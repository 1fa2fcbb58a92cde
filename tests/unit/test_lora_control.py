"""The front end's LoRA registry (which adapter a request runs under, load and unload protocol), the scheduler
loop's load/unload control requests against the fake executor, the OpenAI model-name parsing and the ServerArgs
LoRA flags."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from radixlm.distributed import DPAttention
from radixlm.engine.io_struct import ControlReply, ControlRequest, GenerateRequest
from radixlm.engine.lora_registry import LoRARegistry
from radixlm.engine.scheduler_process import SchedulerLoop
from radixlm.errors import InvalidRequestError
from radixlm.lora import LoRAAdapterError
from radixlm.sampling import SamplingParams
from radixlm.server.app import create_app
from radixlm.server.openai_api import OpenAIServing

from stub_engine import StubEngine
from test_config import parse
from test_server_errors import request as http
from test_scheduler_model_free import make, run

# ------------------------------------------------------------------------------------------ registry


def test_resolve_names_one_adapter_per_prompt() -> None:
    reg = LoRARegistry(True, {"a": "/x/a", "b": "/x/b"})
    assert reg.resolve(None, 2) == [None, None]
    assert reg.resolve("a", 3) == ["a", "a", "a"]
    assert reg.resolve(["b", None], 2) == ["b", None]
    with pytest.raises(InvalidRequestError, match="2 lora_path entries for 3 prompts") as e:
        reg.resolve(["a", "b"], 3)
    assert e.value.param == "lora_path"
    with pytest.raises(InvalidRequestError, match="lora_path must be an adapter name or a list of them"):
        reg.resolve(["a", 3], 2)
    with pytest.raises(InvalidRequestError, match=r"unknown LoRA adapter 'c' \(served: 'a', 'b'\); load it with "
                                                  "/load_lora_adapter") as e:
        reg.resolve(["a", "c"], 2, param="model")
    assert e.value.param == "model"


def test_requests_naming_an_adapter_without_lora_enabled_are_refused() -> None:
    reg = LoRARegistry(False, {})
    assert reg.resolve(None, 1) == [None]
    with pytest.raises(InvalidRequestError, match="LoRA adapter 'a' requested, but this server serves no adapters: "
                                                  r"start it with --enable-lora \(or --lora-paths\)"):
        reg.resolve("a", 1)
    with pytest.raises(LoRAAdapterError, match="need a server started with --enable-lora"):
        reg.load("a", "/x", lambda kind, args: pytest.fail("nothing may reach the scheduler"))
    with pytest.raises(LoRAAdapterError, match="need a server started with --enable-lora"):
        reg.begin_unload("a")


def reply(ok: bool, payload: dict) -> SimpleNamespace:
    return SimpleNamespace(ok=ok, payload=payload)


def test_load_serves_only_what_the_ranks_accepted() -> None:
    reg = LoRARegistry(True, {"a": "/x/a"})
    asked = []

    def ask(kind: str, args: dict) -> SimpleNamespace:
        asked.append((kind, args))
        if args["path"] == "/bad":
            return reply(False, {"message": "LoRA adapter 'b' at /bad: adapter_config.json is missing"})
        return reply(True, {"name": args["name"], "rank": 4, "target_modules": ["q_proj"]})

    with pytest.raises(LoRAAdapterError, match="adapter_config.json is missing"):
        reg.load("b", "/bad", ask)
    assert reg.served() == {"a": "/x/a"}
    assert reg.load("b", "/x/b", ask) == {"name": "b", "rank": 4, "target_modules": ["q_proj"]}
    assert reg.served() == {"a": "/x/a", "b": "/x/b"} and reg.resolve("b", 1) == ["b"]
    with pytest.raises(LoRAAdapterError, match="LoRA adapter 'a' is already loaded; unload it first"):
        reg.load("a", "/x/other", ask)
    with pytest.raises(LoRAAdapterError, match="lora_name and lora_path must be non-empty strings"):
        reg.load(" ", "/x/c", ask)
    assert asked == [("load_lora_adapter", {"name": "b", "path": "/bad"}),
                     ("load_lora_adapter", {"name": "b", "path": "/x/b"})]


def test_unload_refuses_new_requests_at_once_and_waits_for_those_in_flight() -> None:
    reg = LoRARegistry(True, {"a": "/x/a", "b": "/x/b"})
    in_flight = {"a": 2}
    events: list[str] = []

    def ask(kind: str, args: dict) -> SimpleNamespace:
        events.append(f"{kind} {args['name']} with {in_flight['a']} in flight")
        return reply(True, {})

    reg.begin_unload("a")
    with pytest.raises(InvalidRequestError, match="LoRA adapter 'a' is being unloaded and takes no new requests"):
        reg.resolve("a", 1)
    with pytest.raises(LoRAAdapterError, match=r"LoRA adapter 'a' is not loaded \(served: 'b'\)"):
        reg.begin_unload("a")  # one unload at a time
    assert reg.served() == {"b": "/x/b"}
    unloader = threading.Thread(target=reg.finish_unload, args=("a", in_flight.get, ask, None))
    unloader.start()
    for left in (1, 0):
        time.sleep(0.05)
        assert not events  # still waiting
        in_flight["a"] = left
    unloader.join(5)
    assert events == ["unload_lora_adapter a with 0 in flight"]
    with pytest.raises(InvalidRequestError, match="unknown LoRA adapter 'a'"):
        reg.resolve("a", 1)


def test_an_unload_that_times_out_serves_the_adapter_again() -> None:
    reg = LoRARegistry(True, {"a": "/x/a"})
    reg.begin_unload("a")
    with pytest.raises(TimeoutError, match="LoRA adapter 'a' still has 1 requests in flight after 0.05 s"):
        reg.finish_unload("a", lambda name: 1, lambda kind, args: pytest.fail("not unloaded"), 0.05)
    assert reg.resolve("a", 1) == ["a"]


# ------------------------------------------------------------------------------------------ scheduler side


def control(loop: SchedulerLoop, kind: str, **args) -> ControlReply:
    return loop._control(ControlRequest("t", kind, args))


def test_control_requests_load_and_unload_on_the_executor() -> None:
    sched, worker = make()
    loop = SchedulerLoop(sched, DPAttention(), None, None)
    ok = control(loop, "load_lora_adapter", name="a", path="/x/a")
    assert (ok.ok, ok.payload) == (True, {"name": "a", "rank": 8, "target_modules": ["q_proj"]})
    bad = control(loop, "load_lora_adapter", name="b", path="/x/bad")
    assert (bad.ok, bad.payload) == (False, {"message": "LoRA adapter 'b' at /x/bad: adapter_config.json is missing"})
    assert worker.adapters == {"a": "/x/a"}
    # A request of "a" leaves KV in the adapter's cache namespace; the unload frees it
    loop._handle(GenerateRequest("r", [5, 6, 7, 8], SamplingParams(max_new_tokens=2), 0, lora_name="a"))
    run(sched, [loop.reqs["r"]], add=False)
    assert sched.tree_cache.namespaces() == [None, "a"] and sched.tree_cache.total_size() > 0
    assert control(loop, "unload_lora_adapter", name="a").ok
    assert worker.adapters == {} and sched.tree_cache.namespaces() == [None]
    assert sched.tree_cache.total_size() == 0
    missing = control(loop, "unload_lora_adapter", name="a")
    assert (missing.ok, missing.payload) == (False, {"message": "LoRA adapter 'a' is not loaded"})


def test_the_scheduler_refuses_to_unload_an_adapter_it_still_runs() -> None:
    sched, worker = make()
    loop = SchedulerLoop(sched, DPAttention(), None, None)
    assert control(loop, "load_lora_adapter", name="a", path="/x/a").ok
    loop._handle(GenerateRequest("r", [5, 6, 7], SamplingParams(max_new_tokens=4), 0, lora_name="a"))
    refused = control(loop, "unload_lora_adapter", name="a")
    assert (refused.ok, refused.payload) == (False, {"message": "LoRA adapter 'a' still has requests in the "
                                                                "scheduler: ['r']"})
    assert worker.adapters == {"a": "/x/a"} and sched.waiting[0].lora_name == "a"


# ------------------------------------------------------------------------------------------ OpenAI model names


@pytest.mark.parametrize("model, adapter", [
    ("smol:fr", "fr"), ("smol:a:b", "a:b"), ("smol:", ""), ("smol", None), (None, None), ("gpt-4", None),
    ("other:fr", None),
])
def test_openai_model_names_an_adapter_after_the_served_name(model: str | None, adapter: str | None) -> None:
    serving = OpenAIServing(SimpleNamespace(server_args=SimpleNamespace(tool_call_parser=None)), "smol", None)
    assert serving.adapter_of(model) == adapter
    assert serving.response_model(model) == (model if adapter is not None else "smol")


# ------------------------------------------------------------------------------------------ ServerArgs flags


def test_lora_paths_parse_names_and_imply_enable_lora() -> None:
    args = parse(["--device", "cpu", "--lora-paths", "fr=/ad/fr", "/ad/json"])
    assert args.enable_lora and args.lora_path_map() == {"fr": "/ad/fr", "/ad/json": "/ad/json"}
    assert not parse(["--device", "cpu"]).enable_lora


@pytest.mark.parametrize("flags, message", [
    (["--lora-paths", "a=/x", "a=/y"], "names adapter 'a' twice"),
    (["--lora-paths", "=/x"], "must be name=path or a path"),
    (["--enable-lora", "--lora-target-modules", "qkv"], "--lora-target-modules: unknown module 'qkv'"),
    (["--enable-lora", "--quantization", "fp8"], "--enable-lora does not combine with --quantization"),
    (["--enable-lora", "--max-loras-per-batch", "0"], "--max-loras-per-batch must be >= 1, got 0"),
    (["--enable-lora", "--max-lora-rank", "0"], "--max-lora-rank must be >= 1, got 0"),
])
def test_bad_lora_flags_are_refused(flags: list[str], message: str) -> None:
    with pytest.raises(ValueError) as e:
        parse(["--device", "cpu", *flags])
    assert message in str(e.value)


# ------------------------------------------------------------------------------------------ HTTP routes (stub engine)


def test_lora_routes_without_lora_enabled_answer_400() -> None:
    app = create_app(StubEngine())
    status, body = http(app, "POST", "/load_lora_adapter", {"lora_name": "a", "lora_path": "/x"})
    assert (status, body["error"]["message"]) == (400, "LoRA adapters need a server started with --enable-lora")
    status, body = http(app, "POST", "/unload_lora_adapter", {"lora_name": "a"})
    assert (status, body["error"]["param"]) == (400, "lora_name")
    status, body = http(app, "POST", "/load_lora_adapter", {"lora_name": "a"})
    assert status == 400 and body["error"]["param"] == "lora_path"
    assert [m["id"] for m in http(app, "GET", "/v1/models")[1]["data"]] == ["stub"]


def test_models_list_the_startup_adapters() -> None:
    app = create_app(StubEngine(lora_paths=("fr=/ad/fr", "/ad/json")))
    models = http(app, "GET", "/v1/models")[1]["data"]
    assert [(m["id"], m["root"], m["parent"]) for m in models] == [
        ("stub", "stub", None), ("stub:fr", "/ad/fr", "stub"), ("stub:/ad/json", "/ad/json", "stub")]
