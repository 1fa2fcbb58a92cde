"""The adapter memory pool and ``LoRAManager``: which slot an adapter lands in, what is evicted (least recently
used among the adapters the batch does not name), the errors that change nothing, the segments ``prepare``
returns, the slots' contents in the kernels' layout (zero slices, rank 0 where an adapter leaves a projection
alone), and startup refusals.  A tiny random Llama on CPU, adapters built with peft in setup."""

from __future__ import annotations

import pytest
import torch

from radixlm.config import ServerArgs
from radixlm.core import Batch, ForwardMode
from radixlm.lora import LoRAAdapterError
from radixlm.lora.manager import resolve_max_lora_rank
from radixlm.lora.pool import pool_groups
from tests.conftest import build_tiny_hf_model, make_runner, make_worker
from tests.lora_helpers import build_peft_adapter

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> (r, lora_alpha, use_rslora, target_modules, layers_to_transform); the tiny model has 2 layers
ADAPTERS = {
    "qv4": (4, 8, False, ["q_proj", "v_proj"], None),
    "all8_layer1": (8, 16, True, ALL, [1]),
    "mlp2": (2, 4, False, ["gate_proj", "up_proj", "down_proj"], None),
    "o16": (16, 8, False, ["o_proj"], None),
    "r32": (32, 8, False, ["q_proj"], None),  # above the pool's max rank
}
MAX_RANK = 16


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("lora_pool")
    hf = build_tiny_hf_model("llama", str(root / "model"))  # hidden 64, 4 heads, 2 KV heads, head_dim 16
    dirs = {"model": str(root / "model")}
    for i, (name, (r, alpha, rslora, targets, layers)) in enumerate(ADAPTERS.items()):
        dirs[name] = str(root / name)
        build_peft_adapter(hf, dirs[name], r, alpha, rslora, targets, layers, seed=i)
    return dirs


@pytest.fixture(scope="module")
def runner(adapter_dirs):
    """Two slots of rank 16; qv4, all8_layer1 and mlp2 loaded at startup (o16 by the tests)."""
    paths = tuple(f"{n}={adapter_dirs[n]}" for n in ("qv4", "all8_layer1", "mlp2"))
    return make_runner(adapter_dirs["model"], lora_paths=paths, max_loras_per_batch=2, max_lora_rank=MAX_RANK)


def decode(names: list[str | None] | None) -> Batch:
    n = 0 if names is None else len(names)
    return Batch(ForwardMode.DECODE, list(range(n)), [3] * n, [1] * n, [0] * n, torch.empty(0), lora_names=names)


def extend(names: list[str | None], lens: list[int]) -> Batch:
    return Batch(ForwardMode.EXTEND, list(range(len(names))), [0] * len(names), lens, [0] * sum(lens),
                 torch.empty(0), lora_names=names)


def test_lru_residency_and_eviction(runner, adapter_dirs) -> None:
    lora = runner.lora
    assert (lora.num_slots, lora.max_rank, lora.resident) == (2, MAX_RANK, {})
    assert list(lora.adapters) == ["qv4", "all8_layer1", "mlp2"]
    seg = lora.prepare(decode(["qv4", None, "qv4"]))  # the lowest free slot
    assert lora.resident == {"qv4": 0}
    assert seg.seg_starts.tolist() == [0, 1, 2, 3] and seg.seg_slots.tolist() == [0, -1, 0]
    assert (seg.max_seg_len, seg.has_lora) == (1, True)
    lora.prepare(decode(["all8_layer1"]))
    assert list(lora.resident.items()) == [("qv4", 0), ("all8_layer1", 1)]
    lora.prepare(decode(["qv4"]))  # already resident: only its recency changes
    assert list(lora.resident.items()) == [("all8_layer1", 1), ("qv4", 0)]
    lora.prepare(decode(["mlp2", None]))  # evicts the least recently used
    assert list(lora.resident.items()) == [("qv4", 0), ("mlp2", 1)]
    seg = lora.prepare(decode(["all8_layer1", "mlp2"]))  # qv4 is older, but the batch needs mlp2: evict qv4
    assert list(lora.resident.items()) == [("all8_layer1", 0), ("mlp2", 1)]
    assert seg.seg_slots.tolist() == [0, 1]
    # Errors change nothing.
    with pytest.raises(ValueError, match="3 distinct LoRA adapters, more than the 2 slots"):
        lora.prepare(decode(["qv4", "mlp2", "all8_layer1", "qv4"]))
    with pytest.raises(ValueError, match="not loaded: nope"):
        lora.prepare(decode(["qv4", "nope"]))
    with pytest.raises(ValueError, match="2 entries for a batch of 3"):
        lora.prepare(Batch(ForwardMode.DECODE, [0, 1, 2], [1] * 3, [1] * 3, [0] * 3, torch.empty(0),
                           lora_names=["qv4", None]))
    assert list(lora.resident.items()) == [("all8_layer1", 0), ("mlp2", 1)]
    # No adapter list, or none named: no segments (the base-only fast path).
    assert lora.prepare(decode(None)) is None
    assert lora.prepare(decode([None, None])) is None
    assert list(lora.resident.items()) == [("all8_layer1", 0), ("mlp2", 1)]
    # Extend: consecutive rows of one adapter merged, cut into 64-token pieces; base-only runs stay whole.
    seg = lora.prepare(extend(["mlp2", "mlp2", None, None, "all8_layer1"], [70, 3, 100, 5, 2]))
    assert seg.seg_starts.tolist() == [0, 64, 73, 178, 180]
    assert seg.seg_slots.tolist() == [1, 1, -1, 0]
    assert seg.max_seg_len == 64


def test_load_unload_reload(runner, adapter_dirs) -> None:
    lora = runner.lora
    lora.prepare(decode(["qv4", "mlp2"]))
    before = lora.resident
    slot = before["qv4"]
    with pytest.raises(LoRAAdapterError, match="'qv4' is already loaded"):
        lora.load_adapter("qv4", adapter_dirs["o16"])
    with pytest.raises(LoRAAdapterError, match="rank 32 is above the server's max LoRA rank 16"):
        lora.load_adapter("r32", adapter_dirs["r32"])
    assert lora.resident == before and list(lora.adapters) == ["qv4", "all8_layer1", "mlp2"]
    with pytest.raises(KeyError):
        lora.unload_adapter("o16")
    lora.unload_adapter("qv4")  # frees its slot
    assert "qv4" not in lora.adapters and "qv4" not in lora.resident
    with pytest.raises(ValueError, match="not loaded: qv4"):
        lora.prepare(decode(["qv4"]))
    assert lora.load_adapter("o16", adapter_dirs["o16"]).rank == 16
    lora.prepare(decode(["o16"]))  # into the freed slot, evicting nothing
    assert lora.resident == {"mlp2": before["mlp2"], "o16": slot}
    lora.load_adapter("qv4", adapter_dirs["qv4"])  # the same name again after its unload
    lora.prepare(decode(["qv4"]))
    assert lora.resident == {"o16": slot, "qv4": before["mlp2"]}
    lora.unload_adapter("o16")
    assert list(lora.adapters) == ["all8_layer1", "mlp2", "qv4"]


def test_slot_contents(runner) -> None:
    """A slot holds the adapter in the kernels' layout: stacked A with a zero k slice, B beside zeros, the rank
    where it modifies a projection and 0 where it does not (a layer or a whole group it leaves alone)."""
    lora, model = runner.lora, runner.model
    lora.prepare(decode(["qv4", "all8_layer1"]))
    qv, all8 = lora.resident["qv4"], lora.resident["all8_layer1"]
    qv4 = lora.adapters["qv4"]
    for layer in range(2):
        qkv = model.model.layers[layer].self_attn.qkv_proj.lora_weights
        a_q, b_q = qv4.weights[(layer, "q_proj")]
        a_v, b_v = qv4.weights[(layer, "v_proj")]
        a = qkv.a_pool[qv].view(3, MAX_RANK, 64)[:, :4]
        assert torch.equal(a[0], a_q) and torch.equal(a[2], a_v) and not a[1].any()
        assert torch.equal(qkv.b_pool[qv, :, :4], torch.cat([b_q, torch.zeros(32, 4), b_v]))
        assert qkv.slice_offsets.tolist() == [0, 64, 96, 128]
    assert lora.pool.groups == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    assert lora.pool.ranks[:, :, qv].tolist() == [[4, 0, 0, 0], [4, 0, 0, 0]]
    assert lora.pool.ranks[:, :, all8].tolist() == [[0, 0, 0, 0], [8, 8, 8, 8]]
    expected = {qv: 8 / 4, all8: 16 / 8**0.5}  # alpha / r; rsLoRA: alpha / sqrt(r)
    for slot, scaling in expected.items():
        assert lora.pool.scalings[slot].item() == pytest.approx(scaling, rel=1e-6)
    down = model.model.layers[1].mlp.down_proj.lora_weights
    assert (down.a_pool.shape, down.b_pool.shape) == ((2, MAX_RANK, 128), (2, 64, MAX_RANK))
    assert down.ranks.data_ptr() == lora.pool.ranks[1, 3].data_ptr()  # a view: every layer reads the one tensor


def test_dense_pool_extends_the_weights(adapter_dirs) -> None:
    """A dense pool (a GPU's, forced here) moves each projection's weight into the head of ``weight_ext``, its
    ``a_pool`` the tail: the weights keep their values and are views of it, a slot's A lands below them, and the
    decode layout covers every row; the qkv bias (Qwen2's) moves into ``bias_ext`` with zeros below."""
    from radixlm.lora import manager as lora_manager

    plain = make_runner(adapter_dirs["model"], lora_paths=(f"qv4={adapter_dirs['qv4']}",), max_lora_rank=MAX_RANK)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lora_manager, "dense_decode", lambda device: True)
        runner = make_runner(adapter_dirs["model"], lora_paths=(f"qv4={adapter_dirs['qv4']}",),
                             max_lora_rank=MAX_RANK)
    lora = runner.lora
    assert lora.dense and not plain.lora.dense
    seg = lora.prepare(decode(["qv4", None, None]))
    assert seg.dense and seg.seg_slots.tolist() == [0, -1, -1]
    slot = lora.resident["qv4"]
    for layer in range(2):
        for group in lora.pool.groups:
            module = runner.model.lora_projections()[layer][group]
            w = module.lora_weights
            out_local = module.weight.shape[0]
            assert w.weight_ext.shape == (out_local + w.a_pool.shape[0] * w.a_pool.shape[1], w.a_pool.shape[2])
            assert module.weight.data_ptr() == w.weight_ext.data_ptr()
            assert w.a_pool.data_ptr() == w.weight_ext[out_local:].data_ptr()
            assert torch.equal(module.weight, plain.model.lora_projections()[layer][group].weight)
        qkv = runner.model.model.layers[layer].self_attn.qkv_proj.lora_weights
        a_q = lora.adapters["qv4"].weights[(layer, "q_proj")][0]
        assert torch.equal(qkv.weight_ext[128 + slot * 3 * MAX_RANK:][:4], a_q)  # slot's q slice, below W
        assert qkv.bias_ext is None  # Llama's projections have no bias


def test_dense_pool_moves_a_bias() -> None:
    """``_extend_below`` on a layer with a bias: the bias's values kept, a view of ``bias_ext``'s head."""
    from radixlm.layers.linear import ColumnParallelLinear
    from radixlm.lora.pool import _extend_below

    layer = ColumnParallelLinear(8, [6], bias=True)
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    weight, bias = layer.weight.clone(), layer.bias.clone()
    ext, bias_ext = _extend_below(layer, 4, torch.float32, torch.device("cpu"))
    assert ext.shape == (10, 8) and bias_ext.shape == (10,)
    assert torch.equal(layer.weight, weight) and torch.equal(layer.bias, bias)
    assert layer.weight.data_ptr() == ext.data_ptr() and layer.bias.data_ptr() == bias_ext.data_ptr()
    assert not ext[6:].any() and not bias_ext[6:].any()


def test_target_modules_shape_the_pool(adapter_dirs) -> None:
    """``--lora-target-modules q_proj v_proj``: only qkv_proj has a pool; an adapter of o_proj is refused."""
    assert pool_groups(frozenset(["q_proj", "v_proj"])) == ("qkv_proj",)
    assert pool_groups(frozenset(["up_proj", "o_proj"])) == ("o_proj", "gate_up_proj")
    worker = make_worker(adapter_dirs["model"], enable_lora=True, lora_target_modules=("q_proj", "v_proj"))
    layer = worker.runner.model.model.layers[0]
    assert layer.self_attn.qkv_proj.lora_weights is not None
    assert layer.self_attn.o_proj.lora_weights is None and layer.mlp.down_proj.lora_weights is None
    assert worker.runner.lora.max_rank == 64  # no --max-lora-rank, no --lora-paths
    assert worker.load_lora_adapter("qv4", adapter_dirs["qv4"]) == {
        "name": "qv4", "rank": 4, "target_modules": ["q_proj", "v_proj"]}
    with pytest.raises(LoRAAdapterError, match="modifies o_proj, outside the server's LoRA target modules"):
        worker.load_lora_adapter("o16", adapter_dirs["o16"])
    worker.unload_lora_adapter("qv4")
    assert worker.runner.lora.adapters == {}


def test_startup_refusals(adapter_dirs, tmp_path) -> None:
    """The max rank defaults to the largest among --lora-paths; a bad adapter there, a model whose feed-forward
    is a mixture of experts, or one outside the Llama family fails startup with the reason."""
    paths = (f"qv4={adapter_dirs['qv4']}", f"o16={adapter_dirs['o16']}")
    assert resolve_max_lora_rank(ServerArgs(device="cpu", lora_paths=paths)) == 16
    assert resolve_max_lora_rank(ServerArgs(device="cpu", lora_paths=paths, max_lora_rank=8)) == 8
    with pytest.raises(LoRAAdapterError, match="'big'.*has no adapter_config.json"):
        make_runner(adapter_dirs["model"], lora_paths=(f"big={tmp_path}",))
    build_tiny_hf_model("mixtral", str(tmp_path / "moe"))
    with pytest.raises(ValueError, match="LoRA is not supported for MixtralForCausalLM: layer 0's feed-forward"):
        make_runner(str(tmp_path / "moe"), enable_lora=True)
    build_tiny_hf_model("deepseek_v2", str(tmp_path / "mla"))
    with pytest.raises(ValueError, match="LoRA is not supported for DeepseekV2ForCausalLM"):
        make_runner(str(tmp_path / "mla"), enable_lora=True)
