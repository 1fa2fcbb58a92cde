"""The offline Engine with LoRA: ``generate(..., lora_path=...)`` per prompt, ``load_lora_adapter`` and
``unload_lora_adapter`` (which waits for the adapter's requests in flight), in process (the HTTP routes are
tests/e2e/test_lora_serving.py)."""

from __future__ import annotations

import threading
import time

import pytest

import radixlm
from radixlm.errors import InvalidRequestError
from radixlm.lora import LoRAAdapterError
from tests.lora_helpers import build_peft_adapter

PROMPTS = ["The capital of France is", "List three colors:"]
GREEDY = {"max_new_tokens": 12, "temperature": 0}


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, embedded_hf_model) -> str:
    path = str(tmp_path_factory.mktemp("engine-lora") / "a")
    build_peft_adapter(embedded_hf_model, path, r=8, alpha=16, rslora=False, targets=["q_proj", "v_proj", "o_proj"],
                       layers=None, seed=1, std=0.1)
    return path


@pytest.fixture(scope="module")
def engine(adapter_dir):
    with radixlm.Engine(max_total_tokens=4096, random_seed=0, dtype="float32", lora_paths=[f"a={adapter_dir}"]) as e:
        yield e


def texts(outs) -> list[str]:
    return [o["text"] for o in outs]


def test_lora_path_per_prompt(engine) -> None:
    mixed = texts(engine.generate(PROMPTS, GREEDY, lora_path=["a", None]))
    assert mixed == [engine.generate(PROMPTS[0], GREEDY, lora_path="a")["text"],
                     engine.generate(PROMPTS[1], GREEDY)["text"]]
    assert mixed[0] != engine.generate(PROMPTS[0], GREEDY)["text"]
    with pytest.raises(InvalidRequestError, match=r"unknown LoRA adapter 'zzz' \(served: 'a'\)"):
        engine.generate(PROMPTS[0], GREEDY, lora_path="zzz")


def test_live_load_and_unload_waiting_for_a_stream(engine, adapter_dir) -> None:
    info = engine.load_lora_adapter("b", adapter_dir)
    assert info == {"name": "b", "rank": 8, "target_modules": ["o_proj", "q_proj", "v_proj"]}
    # The same weights under another name: the same tokens (and no KV shared with "a": a namespace each)
    assert (engine.generate(PROMPTS[0], GREEDY, lora_path="b")["output_ids"]
            == engine.generate(PROMPTS[0], GREEDY, lora_path="a")["output_ids"])
    with pytest.raises(LoRAAdapterError, match="'b' is already loaded"):
        engine.load_lora_adapter("b", adapter_dir)

    started = time.time()
    stream = engine.generate(PROMPTS[1], {"max_new_tokens": 48, "temperature": 0, "ignore_eos": True},
                             lora_path="b", stream=True)
    first = next(stream)  # the request is in flight
    unloaded: list[float] = []
    unloader = threading.Thread(target=lambda: (engine.unload_lora_adapter("b"), unloaded.append(time.time())))
    unloader.start()
    while "b" in engine.lora.served():
        time.sleep(0.005)
    with pytest.raises(InvalidRequestError, match="'b' is being unloaded and takes no new requests"):
        engine.generate(PROMPTS[0], GREEDY, lora_path="b")
    chunks = [first, *stream]
    unloader.join(60)
    assert sum(len(c["output_ids"]) for c in chunks) == 48  # completed normally
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    # The request finished at created + e2e_latency, and was created after `started`
    assert unloaded[0] >= started + chunks[-1]["meta_info"]["e2e_latency"]
    with pytest.raises(InvalidRequestError, match="unknown LoRA adapter 'b'"):
        engine.generate(PROMPTS[0], GREEDY, lora_path="b")
    with pytest.raises(LoRAAdapterError, match=r"'b' is not loaded \(served: 'a'\)"):
        engine.unload_lora_adapter("b")
    assert engine.generate(PROMPTS[0], GREEDY, lora_path="a")["text"]
