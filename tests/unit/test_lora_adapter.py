"""PEFT LoRA adapters (radixlm.lora): what ``load_lora_adapter`` reads equals what peft itself trained and saved,
the merged/TP layouts reproduce peft's merged model and our base layers' own sharding, and every malformed adapter
is refused with its own message.  Adapters are built with peft on a tiny random Llama (seconds on CPU)."""

from __future__ import annotations

import copy
import json
import os
import shutil

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from radixlm.config.model_config import ModelConfig
from radixlm.distributed import layout_for_sizing
from radixlm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from radixlm.lora import LoRAAdapterError, load_lora_adapter, merged_lora, shard_merged_lora, shard_row_lora
from radixlm.lora.adapter import CONFIG_FILE, SUPPORTED_MODULES, WEIGHTS_FILE
from radixlm.lora.layout import MERGED_PROJECTIONS, column_shard_ranges
from tests.conftest import build_tiny_hf_model
from tests.lora_helpers import build_peft_adapter

ALL = list(SUPPORTED_MODULES)
# (r, lora_alpha, use_rslora, target_modules, layers_to_transform)
ADAPTERS = {
    "all_r4": (4, 8, False, ALL, None),
    "qv_r8_rslora": (8, 16, True, ["q_proj", "v_proj"], None),
    "mlp_r2_layer1": (2, 4, False, ["gate_proj", "down_proj"], [1]),
    "regex_r3_rslora": (3, 7, True, r".*\.(k_proj|up_proj|o_proj)", None),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[torch.nn.Module, ModelConfig]:
    path = str(tmp_path_factory.mktemp("tiny_llama"))
    hf = build_tiny_hf_model("llama", path)  # hidden 64, 4 heads, 2 KV heads, head_dim 16, intermediate 128
    return hf, ModelConfig.from_hf(path, dtype="float32")


def peft_lora_layers(model) -> dict[tuple[int, str], torch.nn.Module]:
    """(layer, module) -> peft's LoRA layer, for every projection the peft model modifies."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            parts = name.split(".")
            found[(int(parts[parts.index("layers") + 1]), parts[-1])] = module
    return found


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory) -> dict[str, tuple[str, object]]:
    hf, _ = base
    built = {}
    for i, (name, spec) in enumerate(ADAPTERS.items()):
        directory = str(tmp_path_factory.mktemp(name))
        built[name] = directory, build_peft_adapter(hf, directory, *spec, seed=i)
    return built


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_loaded_tensors_and_scaling_equal_peft(name, base, adapters) -> None:
    _, model_config = base
    directory, peft_model = adapters[name]
    adapter = load_lora_adapter(name, directory, model_config, max_rank=8)
    layers = peft_lora_layers(peft_model)
    assert set(adapter.weights) == set(layers)
    for key, (a, b) in adapter.weights.items():
        assert torch.equal(a, layers[key].lora_A["default"].weight)
        assert torch.equal(b, layers[key].lora_B["default"].weight)
        assert adapter.scaling == layers[key].scaling["default"]
    assert adapter.rank == ADAPTERS[name][0]


@pytest.mark.parametrize("name", list(ADAPTERS))
@pytest.mark.parametrize("merged", list(MERGED_PROJECTIONS))
def test_merged_layout_matches_peft_merged_model(name, merged, base, adapters) -> None:
    """``x @ W_merged^T`` plus our shrink/expand over the stacked layout equals the output of peft's merged model
    (``merge_and_unload``: W + scaling * B @ A per projection) for the same merged layer."""
    hf, model_config = base
    directory, peft_model = adapters[name]
    adapter = load_lora_adapter(name, directory, model_config, max_rank=8)
    merged_hf = copy.deepcopy(peft_model).merge_and_unload()
    torch.manual_seed(1)
    x = torch.randn(5, model_config.hidden_size)
    for layer in range(model_config.num_hidden_layers):
        block = "self_attn" if merged == "qkv_proj" else "mlp"
        modules = MERGED_PROJECTIONS[merged]
        base_w = torch.cat([getattr(getattr(hf.model.layers[layer], block), m).weight for m in modules])
        expected = torch.cat([getattr(getattr(merged_hf.model.layers[layer], block), m)(x) for m in modules], -1)
        layout = merged_lora(adapter, layer, merged, model_config)
        if layout is None:
            assert not any((layer, m) in adapter.weights for m in modules)
            torch.testing.assert_close(x @ base_w.T, expected, rtol=0, atol=0)
            continue
        y = apply_merged(x, base_w, layout, adapter.rank, adapter.scaling)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def apply_merged(x: torch.Tensor, w: torch.Tensor, layout, r: int, scaling: float) -> torch.Tensor:
    """The reference shrink/expand over a (possibly sharded) merged layout: what the kernels must compute."""
    y = x @ w.T
    h = x @ layout.a.T  # [tokens, num_slices * r]
    for s, (b, off) in enumerate(zip(layout.bs, layout.offsets)):
        y[:, off:off + b.shape[0]] += scaling * h[:, s * r:(s + 1) * r] @ b.T
    return y


def test_untargeted_slices_are_zero(base, adapters) -> None:
    _, model_config = base
    adapter = load_lora_adapter("qv", adapters["qv_r8_rslora"][0], model_config, max_rank=8)
    layout = merged_lora(adapter, 0, "qkv_proj", model_config)
    a_q, b_q = adapter.weights[(0, "q_proj")]
    a_v, b_v = adapter.weights[(0, "v_proj")]
    assert layout.offsets == (0, 64, 96)
    assert torch.equal(layout.a, torch.cat([a_q, torch.zeros(8, 64), a_v]))
    assert torch.equal(layout.bs[0], b_q) and torch.equal(layout.bs[2], b_v)
    assert torch.equal(layout.bs[1], torch.zeros(32, 8))
    assert merged_lora(adapter, 0, "gate_up_proj", model_config) is None


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_column_shards_match_base_layer_loaders(tp_size, base, adapters) -> None:
    """Each slice's B shard is exactly the rows our QKVParallelLinear / MergedColumnParallelLinear load on that
    rank (4 ranks over 2 KV heads: each KV head replicated on 2 ranks); A is whole on every rank."""
    _, cfg = base
    adapter = load_lora_adapter("all", adapters["all_r4"][0], cfg, max_rank=8)
    r = adapter.rank
    for rank in range(tp_size):
        with layout_for_sizing(rank, tp_size):
            # layers whose "input" is the rank dimension: their weight loaders shard B [out, r] like a weight
            qkv = QKVParallelLinear(r, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads)
            gate_up = MergedColumnParallelLinear(r, [cfg.intermediate_size] * 2)
            o = RowParallelLinear(cfg.num_attention_heads * cfg.head_dim, r)
        for layer_module, merged, shard_ids in ((qkv, "qkv_proj", "qkv"), (gate_up, "gate_up_proj", (0, 1))):
            full = merged_lora(adapter, 1, merged, cfg)
            for b, shard_id in zip(full.bs, shard_ids):
                layer_module.weight_loader(layer_module.weight, b, shard_id)
            local = shard_merged_lora(full, merged, cfg, rank, tp_size)
            assert local.a is full.a
            assert torch.equal(torch.cat(local.bs), layer_module.weight.data)
            assert local.offsets == tuple(sum(layer_module.local_sizes[:i]) for i in range(len(shard_ids)))
        a, b = adapter.weights[(1, "o_proj")]
        o.weight_loader(o.weight, a)
        a_local, b_local = shard_row_lora(a, b, rank, tp_size)
        assert torch.equal(a_local, o.weight.data) and b_local is b


@pytest.mark.parametrize("tp_size", [2, 4])
def test_sharded_lora_sums_to_full(tp_size, base, adapters) -> None:
    """Column-parallel: the ranks' local outputs, each slice's columns put back in place, are the full output.
    Row-parallel: the ranks' partial LoRA outputs sum (the all-reduce) to the full one."""
    _, cfg = base
    adapter = load_lora_adapter("all", adapters["all_r4"][0], cfg, max_rank=8)
    torch.manual_seed(2)
    x = torch.randn(3, cfg.hidden_size)
    full = merged_lora(adapter, 0, "qkv_proj", cfg)
    w = torch.zeros(sum(b.shape[0] for b in full.bs), cfg.hidden_size)
    expected = apply_merged(x, w, full, adapter.rank, adapter.scaling)
    for rank in range(tp_size):
        local = shard_merged_lora(full, "qkv_proj", cfg, rank, tp_size)
        y = apply_merged(x, torch.zeros(sum(b.shape[0] for b in local.bs), cfg.hidden_size), local, adapter.rank,
                         adapter.scaling)
        for s, (start, rows) in enumerate(column_shard_ranges("qkv_proj", cfg, rank, tp_size)):
            torch.testing.assert_close(y[:, local.offsets[s]:local.offsets[s] + rows],
                                       expected[:, full.offsets[s] + start:full.offsets[s] + start + rows],
                                       rtol=1e-6, atol=1e-6)
    a, b = adapter.weights[(0, "down_proj")]
    h = torch.randn(3, cfg.intermediate_size)
    local_in = cfg.intermediate_size // tp_size
    partials = [h[:, t * local_in:(t + 1) * local_in] @ shard_row_lora(a, b, t, tp_size)[0].T @ b.T
                for t in range(tp_size)]
    torch.testing.assert_close(sum(partials), h @ a.T @ b.T, rtol=1e-5, atol=1e-5)


def test_dtype_and_allowed_modules(base, adapters) -> None:
    _, cfg = base
    directory = adapters["qv_r8_rslora"][0]
    adapter = load_lora_adapter("qv", directory, cfg, max_rank=8, dtype=torch.bfloat16,
                                allowed_modules={"q_proj", "v_proj"}, allowed_dir=os.path.dirname(directory))
    assert {t.dtype for pair in adapter.weights.values() for t in pair} == {torch.bfloat16}
    assert adapter.target_modules == {"q_proj", "v_proj"}


# --- bad adapters: each is refused with its own message ---

def _edit(config=None, tensors=None, drop=()):
    """A mutation of a valid adapter directory: config dict edits, tensor edits (name -> tensor or None to
    delete), files to delete."""
    def apply(directory: str) -> None:
        with open(os.path.join(directory, CONFIG_FILE)) as f:
            raw = json.load(f)
        raw.update(config or {})
        with open(os.path.join(directory, CONFIG_FILE), "w") as f:
            json.dump(raw, f)
        ts = load_file(os.path.join(directory, WEIGHTS_FILE))
        for k, v in (tensors or {}).items():
            if v is None:
                del ts[k]
            else:
                ts[k] = v
        save_file(ts, os.path.join(directory, WEIGHTS_FILE))
        for fname in drop:
            os.remove(os.path.join(directory, fname))
    return apply


_Q0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_"
_BAD = {
    "rank above max": (_edit(), r"rank 4 is above the server's max LoRA rank 2"),
    "no config": (_edit(drop=[CONFIG_FILE]), r"has no adapter_config\.json"),
    "no weights": (_edit(drop=[WEIGHTS_FILE]), r"has no adapter_model\.safetensors"),
    "unsupported target": (_edit(config={"target_modules": ["q_proj", "lm_head"]}),
                           r"unsupported target module 'lm_head'"),
    "fan_in_fan_out": (_edit(config={"fan_in_fan_out": True}), r"fan_in_fan_out adapters .* not supported"),
    "bias": (_edit(config={"bias": "all"}), r"trained biases .* not supported \(bias='all'\)"),
    "modules_to_save": (_edit(config={"modules_to_save": ["lm_head"]}), r"modules_to_save .* not supported"),
    "dora": (_edit(config={"use_dora": True}), r"DoRA"),
    "rank_pattern": (_edit(config={"rank_pattern": {"q_proj": 8}}), r"per-module ranks"),
    "not lora": (_edit(config={"peft_type": "IA3"}), r"peft_type is 'IA3'"),
    "bad r": (_edit(config={"r": 0}), r"r must be a positive integer; got 0"),
    "wrong shape": (_edit(tensors={_Q0 + "B.weight": torch.zeros(32, 4)}),
                    r"has shape \(32, 4\); the base model's q_proj with r=4 needs \(64, 4\)"),
    "layer out of range": (_edit(tensors={_Q0.replace("layers.0", "layers.2") + "A.weight": torch.zeros(4, 64),
                                          _Q0.replace("layers.0", "layers.2") + "B.weight": torch.zeros(64, 4)}),
                           r"is for layer 2, but the base model has 2 layers"),
    "missing B": (_edit(tensors={_Q0 + "B.weight": None}), r"layer 0 q_proj has no lora_B weight"),
    "non-finite": (_edit(tensors={_Q0 + "A.weight": torch.full((4, 64), float("nan"))}), r"non-finite"),
    "unknown tensor": (_edit(tensors={"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}),
                       r"unexpected tensor 'base_model\.model\.lm_head\.lora_A\.weight'"),
    "module in wrong block": (_edit(tensors={_Q0.replace("self_attn", "mlp") + "A.weight": torch.zeros(4, 64)}),
                              r"unsupported module mlp\.q_proj"),
    "weights not in target_modules": (_edit(config={"target_modules": ["q_proj"]}),
                                      r"has weights for down_proj, .* which its target_modules \['q_proj'\]"),
}


@pytest.mark.parametrize("case", list(_BAD))
def test_bad_adapter_is_refused(case, base, adapters, tmp_path) -> None:
    _, cfg = base
    directory = str(tmp_path / "adapter")
    shutil.copytree(adapters["all_r4"][0], directory)
    mutate, message = _BAD[case]
    mutate(directory)
    with pytest.raises(LoRAAdapterError, match=message):
        load_lora_adapter("bad", directory, cfg, max_rank=2 if case == "rank above max" else 8)


def test_pickle_weights_refused_with_reason(base, adapters, tmp_path) -> None:
    _, cfg = base
    directory = tmp_path / "adapter"
    shutil.copytree(adapters["all_r4"][0], directory)
    os.rename(directory / WEIGHTS_FILE, directory / "adapter_model.bin")
    with pytest.raises(LoRAAdapterError, match=r"only safetensors are loaded, because a \.bin is a pickle"):
        load_lora_adapter("bin", str(directory), cfg, max_rank=8)


def test_path_outside_allowed_dir_refused_through_symlink(base, adapters, tmp_path) -> None:
    """A link inside the allowed directory that points outside it is refused (paths are resolved first)."""
    _, cfg = base
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "link").symlink_to(adapters["all_r4"][0])
    with pytest.raises(LoRAAdapterError, match=r"outside the allowed adapter directory"):
        load_lora_adapter("link", str(allowed / "link"), cfg, max_rank=8, allowed_dir=str(allowed))
    shutil.copytree(adapters["all_r4"][0], allowed / "inside")
    (allowed / "inside" / WEIGHTS_FILE).unlink()
    (allowed / "inside" / WEIGHTS_FILE).symlink_to(os.path.join(adapters["all_r4"][0], WEIGHTS_FILE))
    with pytest.raises(LoRAAdapterError, match=r"outside the allowed adapter directory"):
        load_lora_adapter("file_link", str(allowed / "inside"), cfg, max_rank=8, allowed_dir=str(allowed))


def test_module_not_allowed_by_server(base, adapters) -> None:
    _, cfg = base
    with pytest.raises(LoRAAdapterError, match=r"modifies k_proj, o_proj, up_proj, outside the server's LoRA "
                                               r"target modules \(q_proj, v_proj; --lora-target-modules\)"):
        load_lora_adapter("re", adapters["regex_r3_rslora"][0], cfg, max_rank=8, allowed_modules={"q_proj", "v_proj"})


def test_not_a_directory(base, tmp_path) -> None:
    _, cfg = base
    with pytest.raises(LoRAAdapterError, match=r"is not a directory"):
        load_lora_adapter("none", str(tmp_path / "missing"), cfg, max_rank=8)
