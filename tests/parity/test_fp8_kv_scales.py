"""FP8 KV-cache scales from the checkpoint (``radixlm/models/kv_scales.py``).

The models are tiny HF models whose K and V (MLA: the latent and its rope key) are made ``F``x larger in the
checkpoint, ``F`` a power of two, with the reader of them made ``F``x smaller (q_proj / o_proj, MLA: kv_b_proj and
q's rope rows): the same function, but K and V far past E4M3's +-448.  With the checkpoint scale ``F`` the cache
stores exactly the original model's values (a power of two divides exactly), so the logits are those of the
original model over an FP8 cache at scale 1.0, close to HF's; without it the values saturate and the logits are
wrong by more than their own size.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from radixlm.mem import MLAKVPool
from radixlm.models.kv_scales import KVScales, kv_scale_name

from conftest import MLA_CONFIGS, build_tiny_hf_model, make_worker, random_seqs
from hf_reference import check_extend_and_decode

K_FACTOR, V_FACTOR = 1024.0, 512.0  # K (MLA: the latent) and V made this much larger: |K|, |V| up to ~3000
SEQS, PREFIXES = random_seqs((21, 5, 13, 30)), [9, 0, 12, 20]
UNBOUNDED = float("inf")  # check_extend_and_decode as a measurement: the largest logit error against HF

CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))


def save_checkpoint(tensors: dict[str, torch.Tensor], src: str, dst: str) -> str:
    """``dst``: ``src``'s config and tokenizer files with ``tensors`` as its weights."""
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if not f.endswith(".safetensors"):
            with open(os.path.join(src, f), "rb") as a, open(os.path.join(dst, f), "wb") as b:
                b.write(a.read())
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    return dst


def enlarged_llama(tensors: dict[str, torch.Tensor], layers: int, k: float, v: float) -> dict[str, torch.Tensor]:
    """K ``k``x and V ``v``x larger, q and the output projection compensating: the same function."""
    out = dict(tensors)
    for i in range(layers):
        p = f"model.layers.{i}.self_attn."
        out[p + "k_proj.weight"] = tensors[p + "k_proj.weight"] * k
        out[p + "q_proj.weight"] = tensors[p + "q_proj.weight"] / k
        out[p + "v_proj.weight"] = tensors[p + "v_proj.weight"] * v
        out[p + "o_proj.weight"] = tensors[p + "o_proj.weight"] / v
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory):
    """(HF model, original checkpoint dir, its tensors, a scratch dir for the variants)."""
    path = str(tmp_path_factory.mktemp("llama"))
    hf = build_tiny_hf_model("llama", path)
    return hf, path, load_file(os.path.join(path, "model.safetensors")), tmp_path_factory.mktemp("variants")


def test_scale_names() -> None:
    assert kv_scale_name("model.layers.3.self_attn.k_scale") == (3, "k")
    assert kv_scale_name("model.layers.3.self_attn.v_scale") == (3, "v")
    assert kv_scale_name("model.layers.12.self_attn.kv_scale") == (12, "kv")
    assert kv_scale_name("model.layers.0.self_attn.k_proj.k_scale") == (0, "k")  # ModelOpt
    assert kv_scale_name("model.layers.0.self_attn.v_proj.v_scale") == (0, "v")
    assert kv_scale_name("model.layers.1.self_attn.k_proj.output_scale") == (1, "k")  # compressed-tensors
    assert kv_scale_name("model.layers.1.self_attn.v_proj.output_scale") == (1, "v")
    assert kv_scale_name("model.layers.2.self_attn.kv_a_proj_with_mqa.k_scale") == (2, "k")  # DeepSeek MLA
    assert kv_scale_name("model.layers.2.self_attn.q_scale") == (2, "")  # attention-quantization: dropped
    assert kv_scale_name("model.layers.2.self_attn.prob_scale") == (2, "")
    for other in ("model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.k_proj.input_scale",
                  "model.layers.0.self_attn.k_proj.weight_scale", "model.layers.0.self_attn.k_proj.weight_scale_inv",
                  "model.layers.0.mlp.down_proj.output_scale", "lm_head.k_scale"):
        assert kv_scale_name(other) is None


def test_take_and_layer_defaults() -> None:
    scales = KVScales()
    stream = [("model.layers.0.self_attn.k_scale", torch.tensor(2.0)),
              ("model.layers.0.self_attn.k_proj.weight", torch.zeros(2)),
              ("model.layers.1.self_attn.kv_scale", torch.tensor([0.5])),
              ("model.layers.2.self_attn.v_scale", torch.tensor([0.25, 0.75])),  # per head: the largest
              ("model.layers.2.self_attn.q_scale", torch.tensor(9.0))]
    assert [n for n, _ in scales.take(stream)] == ["model.layers.0.self_attn.k_proj.weight"]
    assert scales.layer(0) == (2.0, 1.0) and scales.layer(1) == (0.5, 0.5) and scales.layer(2) == (1.0, 0.75)
    assert scales.layer(3) == (1.0, 1.0) and not KVScales()


@pytest.mark.parametrize("form", ["k_scale/v_scale", "modelopt", "kv_scale"])
@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_llama_checkpoint_scales(llama, form: str, device: str) -> None:
    hf, original, tensors, scratch = llama
    layers = hf.config.num_hidden_layers
    v_factor = K_FACTOR if form == "kv_scale" else V_FACTOR  # one scale for both: V as large as K
    enlarged = enlarged_llama(tensors, layers, K_FACTOR, v_factor)
    with_scales = dict(enlarged)
    for i in range(layers):
        p = f"model.layers.{i}.self_attn."
        if form == "kv_scale":
            with_scales[p + "kv_scale"] = torch.tensor(K_FACTOR)
        elif form == "modelopt":
            with_scales[p + "k_proj.k_scale"] = torch.tensor(K_FACTOR)
            with_scales[p + "v_proj.v_scale"] = torch.tensor(v_factor)
        else:  # a scalar and a 1-element tensor
            with_scales[p + "k_scale"] = torch.tensor(K_FACTOR)
            with_scales[p + "v_scale"] = torch.tensor([v_factor])
    scaled_dir = save_checkpoint(with_scales, original, str(scratch / f"{form.replace('/', '_')}_scaled"))
    fp8 = dict(kv_cache_dtype="fp8_e4m3", attention_backend="triton" if device == "cuda" else "torch_native",
               device=device)

    scaled = make_worker(scaled_dir, **fp8)
    assert scaled.runner.kv_pool.scales.tolist() == [[K_FACTOR, v_factor]] * layers
    err_scaled = check_extend_and_decode(scaled, hf, SEQS, PREFIXES, tol=UNBOUNDED)
    del scaled
    err_original = check_extend_and_decode(make_worker(original, **fp8), hf, SEQS, PREFIXES, tol=UNBOUNDED)
    unscaled_dir = save_checkpoint(enlarged, original, str(scratch / f"{form.replace('/', '_')}_unscaled"))
    err_unscaled = check_extend_and_decode(make_worker(unscaled_dir, **fp8), hf, SEQS, PREFIXES, tol=UNBOUNDED)
    # Measured on CPU: 0.18 for both (logits up to ~3.4); 3.5 with the scales ignored.
    assert abs(err_scaled - err_original) < 1e-3 and err_scaled < 0.4
    assert err_unscaled > 1.0


def test_scales_ignored_without_fp8_cache(llama) -> None:
    """A checkpoint with KV scales under ``--kv-cache-dtype auto`` (float32 here) loads and serves exactly."""
    hf, original, tensors, scratch = llama
    with_scales = enlarged_llama(tensors, hf.config.num_hidden_layers, K_FACTOR, V_FACTOR)
    with_scales["model.layers.0.self_attn.k_scale"] = torch.tensor(K_FACTOR)
    with_scales["model.layers.1.self_attn.kv_scale"] = torch.tensor([K_FACTOR])
    with_scales["model.layers.1.self_attn.q_scale"] = torch.tensor(1.0)
    worker = make_worker(save_checkpoint(with_scales, original, str(scratch / "auto")),
                         attention_backend="torch_native")
    assert worker.runner.kv_pool.scales is None and worker.runner.model.kv_scales.layer(1) == (K_FACTOR, K_FACTOR)
    check_extend_and_decode(worker, hf, SEQS, PREFIXES, tol=1e-4)


def enlarged_mla(tensors: dict[str, torch.Tensor], spec: dict, factor: float) -> dict[str, torch.Tensor]:
    """DeepSeek-V2 (q_proj, no q LoRA) with the cached latent and rope key ``factor``x larger: kv_a_layernorm's
    weight and kv_a_proj_with_mqa's rope rows up, kv_b_proj (reads the latent) and q's rope rows down."""
    out = dict(tensors)
    rank, nope, rope = spec["kv_lora_rank"], spec["qk_nope_head_dim"], spec["qk_rope_head_dim"]
    for i in range(spec["num_hidden_layers"]):
        p = f"model.layers.{i}.self_attn."
        out[p + "kv_a_layernorm.weight"] = tensors[p + "kv_a_layernorm.weight"] * factor
        out[p + "kv_b_proj.weight"] = tensors[p + "kv_b_proj.weight"] / factor
        kv_a = tensors[p + "kv_a_proj_with_mqa.weight"].clone()  # [rank + rope, hidden]
        kv_a[rank:] *= factor
        out[p + "kv_a_proj_with_mqa.weight"] = kv_a
        q = tensors[p + "q_proj.weight"].clone().view(spec["num_attention_heads"], nope + rope, -1)
        q[:, nope:] /= factor
        out[p + "q_proj.weight"] = q.view(-1, q.shape[-1])
    return out


def test_mla_checkpoint_scale(tmp_path) -> None:
    """One scale for the latent cache: the checkpoint's K scale (DeepSeek exports name it on
    kv_a_proj_with_mqa); a V scale there is not used."""
    spec = MLA_CONFIGS["deepseek_v2"]
    original = str(tmp_path / "original")
    hf = build_tiny_hf_model("deepseek_v2", original)
    enlarged = enlarged_mla(load_file(os.path.join(original, "model.safetensors")), spec, K_FACTOR)
    with_scales = dict(enlarged)
    for i in range(spec["num_hidden_layers"]):
        with_scales[f"model.layers.{i}.self_attn.kv_a_proj_with_mqa.k_scale"] = torch.tensor(K_FACTOR)
        with_scales[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(3.0)
    fp8 = dict(kv_cache_dtype="fp8_e4m3", attention_backend="torch_native")

    scaled = make_worker(save_checkpoint(with_scales, original, str(tmp_path / "scaled")), **fp8)
    assert isinstance(scaled.runner.kv_pool, MLAKVPool)
    assert scaled.runner.kv_pool.scales.tolist() == [[K_FACTOR]] * spec["num_hidden_layers"]
    err_scaled = check_extend_and_decode(scaled, hf, SEQS, PREFIXES, tol=UNBOUNDED)
    del scaled
    err_original = check_extend_and_decode(make_worker(original, **fp8), hf, SEQS, PREFIXES, tol=UNBOUNDED)
    unscaled = make_worker(save_checkpoint(enlarged, original, str(tmp_path / "unscaled")), **fp8)
    err_unscaled = check_extend_and_decode(unscaled, hf, SEQS, PREFIXES, tol=UNBOUNDED)
    # Measured on CPU: 0.21 for both; 4.0 with the scale ignored.
    assert abs(err_scaled - err_original) < 1e-3 and err_scaled < 0.4
    assert err_unscaled > 1.0
