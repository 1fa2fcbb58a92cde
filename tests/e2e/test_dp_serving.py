"""Data-parallel attention served end to end on CPU (gloo, float32, greedy): ``Engine`` at ``--tp-size 2 --dp-size 2
--enable-dp-attention`` (and 4 / 2) on a tiny DeepSeek-V3 with the embedded model's tokenizer gives every request
the tokens a ``--tp-size 1`` Engine gives it on the same weights, while each DP rank schedules its own requests
with its own KV pool and radix cache: through chunked prefill, retraction in a tiny pool, the overlap schedule on
and off, a JSON-schema constrained request and an abort while others run; the ``prefix`` dispatcher sends a
shared prefix back to the rank that caches it.  Each engine starts once per module (a few seconds each).  On 4
GPUs the same holds over NCCL with the Triton kernels (``test_dp_serving_on_cuda``)."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
import torch

import radixlm

from conftest import build_tiny_hf_model, copy_embedded_tokenizer, random_seqs

COMMON = dict(dtype="float32", random_seed=0, device="cpu", attention_backend="torch_native")
DP2 = dict(tp_size=2, dp_size=2, enable_dp_attention=True)

# Prompts of different lengths and new-token counts (EOS ignored): at most 50 + 24 tokens each.
PROMPTS = random_seqs((5, 17, 3, 30, 9, 12, 40, 2), seed=3)
NEWS = [14, 7, 20, 3, 9, 16, 6, 24]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}
JSON_PROMPT = random_seqs((11,), seed=5)[0]
# Two families of prompts, each sharing a two-block (128-token) prefix, with distinct tails
PREFIXES = random_seqs((128, 128), seed=9)
TAILS = random_seqs((3, 7, 5), seed=11)
FAMILIES = [[prefix + tail for tail in TAILS] for prefix in PREFIXES]
COPIED = random_seqs((21,), seed=13)[0]  # a prompt asked for with n = 3


def greedy(new_tokens: int, **extra) -> dict:
    return {"max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True, **extra}


def generate(engine, prompts: list[list[int]], news: list[int]) -> list[list[int]]:
    outs = engine.generate(input_ids=prompts, sampling_params=[greedy(n) for n in news])
    return [o["output_ids"] for o in outs]


def constrained(engine) -> list[int]:
    out = engine.generate(input_ids=JSON_PROMPT, sampling_params=greedy(24, json_schema=json.dumps(SCHEMA)))
    return out["output_ids"]


def dp_states(engine) -> list[dict]:
    return engine.control("get_state").payload["dp"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    """A tiny DeepSeek-V3 (MoE, MLA with q LoRA, YaRN) over the embedded model's vocabulary and tokenizer."""
    path = str(tmp_path_factory.mktemp("dp_v3"))
    build_tiny_hf_model("deepseek_v3", path, overrides={"vocab_size": 49152})
    return copy_embedded_tokenizer(path)


@pytest.fixture(scope="module")
def reference(model) -> dict[str, list]:
    """Every workload's outputs from one process (TP=1), with room for everything."""
    with radixlm.Engine(model, max_total_tokens=4096, **COMMON) as engine:
        return {"mixed": generate(engine, PROMPTS, NEWS), "json": constrained(engine),
                "families": [generate(engine, family, [5] * len(family)) for family in FAMILIES],
                "copied": generate(engine, [COPIED], [6])[0]}


def test_tp2_dp2_chunked_retracted_overlapped_constrained_aborted(model, reference):
    """Overlap on, 16-token prefill chunks, 64 KV tokens per DP rank (retraction), metrics on; the mixed batch, a
    constrained request and a long request aborted after its first token, all at once."""
    with radixlm.Engine(model, max_total_tokens=64, chunked_prefill_size=16, schedule_conservativeness=0.3,
                        enable_metrics=True, **DP2, **COMMON) as engine:
        results: dict[str, object] = {}
        runs = [threading.Thread(target=lambda: results.update(mixed=generate(engine, PROMPTS, NEWS))),
                threading.Thread(target=lambda: results.update(json=constrained(engine)))]
        for t in runs:
            t.start()
        stream = engine.generate(input_ids=PROMPTS[0], sampling_params=greedy(80), stream=True)
        first = next(stream)
        engine.abort(first["meta_info"]["id"])
        last = [first, *stream][-1]
        for t in runs:
            t.join()
        assert last["meta_info"]["finish_reason"]["type"] == "abort"
        assert results["mixed"] == reference["mixed"]
        assert results["json"] == reference["json"]
        states = dp_states(engine)
        assert len(states) == 2 and all(s["cached_kv_tokens"] > 0 for s in states), "both DP ranks served"
        assert sum(s["num_retracted_reqs"] for s in states) > 0
        assert all(s["max_total_num_tokens"] == 64 for s in states) and engine.info.max_total_num_tokens == 64
        # the front end sees both ranks' stats (each leader sends its own twice a second)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and b'dp_rank="1"' not in engine.metrics.render():
            time.sleep(0.1)
        text = engine.metrics.render().decode()
        for rank in (0, 1):
            assert re.search(rf'^radixlm:token_usage_per_dp_rank{{.*dp_rank="{rank}".*}} ', text, re.M), text
        assert re.search(r'^radixlm:max_total_num_tokens{.*} 128\.0$', text, re.M), "the total of both pools"
        assert engine.flush_cache()
        assert all(s["cached_kv_tokens"] == 0 for s in dp_states(engine))


def test_tp2_dp2_prefix_dispatch_without_overlap(model, reference):
    """``--load-balance-method prefix`` with the overlap schedule off: after one prompt of each family is served,
    the family's other prompts go to the rank that caches its prefix and reuse both blocks from its radix cache;
    the n copies of a prompt follow its one prefill."""
    with radixlm.Engine(model, max_total_tokens=2048, load_balance_method="prefix", disable_overlap_schedule=True,
                        **DP2, **COMMON) as engine:
        firsts = engine.generate(input_ids=[f[0] for f in FAMILIES], sampling_params=greedy(5))
        per_rank = [s["cached_kv_tokens"] for s in dp_states(engine)]
        assert all(c > 0 for c in per_rank), "shortest queue put the two families on different ranks"
        rests = engine.generate(input_ids=[p for f in FAMILIES for p in f[1:]], sampling_params=greedy(5))
        assert all(o["meta_info"]["cached_tokens"] >= 128 for o in rests)
        outputs = [[firsts[i]["output_ids"]] + [o["output_ids"] for o in rests[2 * i : 2 * i + 2]]
                   for i in range(len(FAMILIES))]
        assert outputs == reference["families"]
        assert generate(engine, PROMPTS, NEWS) == reference["mixed"]
        # n copies go to the rank that prefilled their prompt once: each finds it there
        copies = engine.generate(input_ids=COPIED, sampling_params=greedy(6, n=3))
        assert [c["output_ids"] for c in copies] == [reference["copied"]] * 3
        assert all(c["meta_info"]["cached_tokens"] == len(COPIED) - 1 for c in copies)


def test_tp4_dp2(model, reference):
    """Attention groups of two ranks: the ranks of a DP rank agree on every step, its leader alone answers."""
    with radixlm.Engine(model, max_total_tokens=2048, **{**DP2, "tp_size": 4}, **COMMON) as engine:
        assert generate(engine, PROMPTS, NEWS) == reference["mixed"]
        assert all(s["num_tracked_reqs"] == 0 and s["cached_kv_tokens"] > 0 for s in dp_states(engine))


@pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs 4 GPUs")
def test_dp_serving_on_cuda(model):
    """NCCL groups, Triton attention and MoE kernels, the overlap schedule with device-side placeholders, CUDA graphs
    (off under DP attention, on in the reference): every --dp-size at TP 2 and 4 against one GPU."""
    cuda = dict(dtype="float32", random_seed=0, device="cuda", max_total_tokens=4096)
    with radixlm.Engine(model, **cuda) as engine:
        want = (generate(engine, PROMPTS, NEWS), constrained(engine))
    for tp, dp in ((2, 2), (4, 2), (4, 4)):
        with radixlm.Engine(model, tp_size=tp, dp_size=dp, enable_dp_attention=True, **cuda) as engine:
            assert (generate(engine, PROMPTS, NEWS), constrained(engine)) == want, (tp, dp)
            assert all(s["cached_kv_tokens"] > 0 for s in dp_states(engine)), (tp, dp)
