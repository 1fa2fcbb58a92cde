"""FP8 weights served end to end: the ``Engine`` with ``--quantization fp8`` on the embedded model, and
``radixlm serve`` on a block-wise FP8 checkpoint (native /generate, token ids in and out); each answer equals the
static batch's greedy tokens with the same weights (parity with HF is in tests/parity/test_fp8.py)."""

from __future__ import annotations

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


def test_serve_block_fp8_checkpoint(tmp_path):
    path = str(tmp_path)
    build_tiny_fp8_model("llama", path, block=(16, 16))
    ids = list(range(10, 40))
    want = static_greedy(path, ids, 8)
    server = LiveServer("--model-path", path, "--skip-tokenizer-init", "--max-total-tokens", "2048")
    try:
        status, body = server.request("POST", "/generate", {"input_ids": ids, "sampling_params": {
            "max_new_tokens": 8, "temperature": 0, "ignore_eos": True}})
        assert status == 200 and body["output_ids"] == want
    finally:
        server.stop()
