"""radixlm.layers.rotary against transformers' own rotary code, on the same inputs.

Layouts: q/k here are the engine's ``[num_tokens, heads, head_dim]``; transformers' functions take
``[batch, heads, seq, head_dim]``, so ``to_hf``/``from_hf`` transpose around them (a batch of one sequence whose
"sequence" is the engine's batch of tokens, at random, unordered, repeated positions).

Exact equality is required wherever transformers computes with the same operations in the same order: cos/sin
from the same fp32 ``position * inv_freq``, cast to the activation dtype, then each product and sum rounded to it
(Llama, DeepSeek-V3, Qwen2-VL, in fp32 and bf16).  DeepSeek-V2's complex form differs (see
``test_interleaved_matches_deepseek_v2``) and gets a bound derived from the rounding steps.

On CUDA every layer test runs on the GPU as well (the Triton path), still against the CPU reference.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf_deepseek_v2
from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_deepseek_v3
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
from transformers.models.llama import modeling_llama as hf_llama
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.qwen2_vl import modeling_qwen2_vl as hf_qwen2_vl
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig

from radixlm.config.model_config import _rope
from radixlm.layers.rotary import (
    MRotaryEmbedding,
    RotaryEmbedding,
    get_rope,
    rope_frequencies,
    yarn_softmax_scale_factor,
)

DTYPES = [torch.float32, torch.bfloat16]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
MAX_POSITION = 8192
NUM_TOKENS = 37

# DeepSeek's YaRN, in the legacy (transformers 4) key form their config.json files use
DEEPSEEK_V3_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                    "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
DEEPSEEK_V2_LITE_YARN = {**DEEPSEEK_V3_YARN, "mscale": 0.707, "mscale_all_dim": 0.707}
# Without mscale the attention factor is yarn_mscale(factor) = 1.37, so cos/sin are visibly scaled
PLAIN_YARN = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096}
YARN_CONFIGS = {"deepseek_v3": DEEPSEEK_V3_YARN, "deepseek_v2_lite": DEEPSEEK_V2_LITE_YARN, "plain": PLAIN_YARN}
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 512}
MROPE_SECTION = [16, 24, 24]


def randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Drawn in fp32, so every dtype sees the same values up to rounding."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def qk(head_dim: int, dtype: torch.dtype, num_heads: int = 4, num_kv_heads: int = 2) -> tuple[torch.Tensor, ...]:
    """q [NUM_TOKENS, num_heads, head_dim] and k [NUM_TOKENS, num_kv_heads, head_dim], scaled so that values
    reach a few units (several binades of rounding)."""
    return (3 * randn(NUM_TOKENS, num_heads, head_dim, dtype=torch.float32, seed=1)).to(dtype), \
        (3 * randn(NUM_TOKENS, num_kv_heads, head_dim, dtype=torch.float32, seed=2)).to(dtype)


def random_positions(*shape: int, seed: int = 3) -> torch.Tensor:
    """Unordered positions over the whole range, both ends included (well past YaRN's original 4096)."""
    positions = torch.randint(0, MAX_POSITION, shape, generator=torch.Generator().manual_seed(seed))
    positions[..., 0], positions[..., 1] = 0, MAX_POSITION - 1
    return positions


def to_hf(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1)[None]  # [1, heads, num_tokens, head_dim]


def from_hf(x: torch.Tensor) -> torch.Tensor:
    return x[0].transpose(0, 1)  # [num_tokens, heads, head_dim]


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """Pairs (2i, 2i+1) moved to (i, i + d/2): DeepSeek-V3's transformers code returns its rotated q/k so."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


def rotate(rope: RotaryEmbedding, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
           device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``forward`` (the fused kernel where the layer has one) on ``device`` and ``forward_native`` on CPU."""
    fused = rope.to(device)(positions.to(device), q.to(device), k.to(device))
    native = rope.cpu().forward_native(positions, q, k)
    return [(fused[0].cpu(), fused[1].cpu()), native]


def hf_rope_params(scaling: dict[str, Any] | None, theta: float) -> dict[str, Any]:
    return {**(scaling or {"rope_type": "default"}), "rope_theta": theta}


def deepseek_config(config_class: type, scaling: dict[str, Any] | None) -> Any:
    """A DeepSeek config whose rotated head part (qk_rope_head_dim, the head_dim of its rope) is 64."""
    return config_class(qk_rope_head_dim=64, max_position_embeddings=163840,
                        rope_parameters=hf_rope_params(scaling, 10000.0))


# ----------------------------------------------------------------------------------------------- config -> layer


QWEN2_VL_V4 = {"rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": MROPE_SECTION}}


def qwen2_vl_v5() -> dict[str, Any]:
    """QWEN2_VL_V4 as transformers 5 stores it: "mrope" rewritten to "default", the sections kept.  (The config
    takes over the dict it is given, so it gets a copy.)"""
    legacy = {**QWEN2_VL_V4, "rope_scaling": dict(QWEN2_VL_V4["rope_scaling"])}
    return {"rope_parameters": Qwen2VLTextConfig(**legacy).rope_parameters}


@pytest.mark.parametrize(
    "hf_config, rope_class, rope_type",
    [
        ({"rope_theta": 500000.0}, RotaryEmbedding, None),
        ({"rope_theta": 500000.0, "rope_scaling": LLAMA3_SCALING}, RotaryEmbedding, "llama3"),
        ({"rope_parameters": {**LLAMA3_SCALING, "rope_theta": 500000.0}}, RotaryEmbedding, "llama3"),
        ({"rope_theta": 10000.0, "rope_scaling": DEEPSEEK_V3_YARN}, RotaryEmbedding, "yarn"),
        # as transformers 5 stores it (both "type" and "rope_type")
        ({"rope_parameters": deepseek_config(DeepseekV3Config, DEEPSEEK_V3_YARN).rope_parameters},
         RotaryEmbedding, "yarn"),
        (QWEN2_VL_V4, MRotaryEmbedding, "default"),
        (qwen2_vl_v5(), MRotaryEmbedding, "default"),
        ({"rope_parameters": {"rope_type": "default", "mrope_section": MROPE_SECTION, "rope_theta": 1000000.0}},
         MRotaryEmbedding, "default"),
        # Qwen2.5-VL's recipe for long inputs: YaRN frequencies under M-RoPE
        ({"rope_theta": 1000000.0, "rope_scaling": {"type": "yarn", "factor": 4.0, "mrope_section": MROPE_SECTION,
                                                    "original_max_position_embeddings": 32768}},
         MRotaryEmbedding, "yarn"),
    ],
)
def test_factory_picks_class_from_both_dialects(hf_config: dict[str, Any], rope_class: type,
                                                rope_type: str | None) -> None:
    theta, scaling = _rope(hf_config)
    assert (scaling is None) == (rope_type is None)
    if scaling is not None:
        assert scaling["rope_type"] == rope_type and "type" not in scaling
    rope = get_rope(128, 64, theta, scaling)
    assert type(rope) is rope_class and rope.is_neox_style
    inv_freq, attention_factor = rope_frequencies(128, theta, scaling)
    angles = torch.outer(torch.arange(64, dtype=torch.float32), inv_freq)
    assert torch.equal(rope.cos_sin_cache, torch.cat([angles.cos(), angles.sin()], -1) * attention_factor)


def test_factory_both_dialects_same_layer() -> None:
    """A model's config.json in either dialect, as transformers writes it, gives the same parsed rope."""
    for v4, v5 in [
        ({"rope_theta": 10000.0, "rope_scaling": DEEPSEEK_V2_LITE_YARN},
         {"rope_parameters": deepseek_config(DeepseekV2Config, DEEPSEEK_V2_LITE_YARN).rope_parameters}),
        (QWEN2_VL_V4, qwen2_vl_v5()),
    ]:
        assert _rope(v4) == _rope(v5)


def test_factory_interleaved_layout() -> None:
    assert not get_rope(64, 64, 10000.0, None, is_neox_style=False).is_neox_style


@pytest.mark.parametrize(
    "scaling, message",
    [
        ({"rope_type": "dynamic", "factor": 2.0}, "unsupported rope scaling 'dynamic'"),
        ({"rope_type": "default", "mrope_section": [16, 24, 16]}, "summing to rotary_dim / 2"),
        ({"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True}, "interleaved M-RoPE"),
    ],
)
def test_factory_rejects_what_it_cannot_do(scaling: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_rope(128, 64, 10000.0, scaling)


# --------------------------------------------------------------------------------------------- NeoX (unchanged)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING, PLAIN_YARN], ids=["default", "llama3", "yarn"])
def test_neox_matches_llama(scaling: dict[str, Any] | None, dtype: torch.dtype, device: str) -> None:
    """Llama's rotary (the NeoX layout) with each frequency scaling, bit for bit, through kernel and torch code."""
    hf_config = LlamaConfig(hidden_size=512, num_attention_heads=4, max_position_embeddings=MAX_POSITION,
                            rope_parameters=hf_rope_params(scaling, 500000.0))
    rope = get_rope(128, MAX_POSITION, 500000.0, scaling)
    positions, (q, k) = random_positions(NUM_TOKENS), qk(128, dtype)
    cos, sin = hf_llama.LlamaRotaryEmbedding(hf_config)(q, positions[None])
    hf_q, hf_k = hf_llama.apply_rotary_pos_emb(to_hf(q), to_hf(k), cos, sin)
    for out_q, out_k in rotate(rope, positions, q, k, device):
        assert torch.equal(out_q, from_hf(hf_q)) and torch.equal(out_k, from_hf(hf_k))


# ------------------------------------------------------------------------------------------------------- YaRN


@pytest.mark.parametrize("name", YARN_CONFIGS)
def test_yarn_frequencies_and_table_match_transformers(name: str) -> None:
    """inv_freq and the attention factor equal ``ROPE_INIT_FUNCTIONS["yarn"]``'s; every row of the cos/sin table
    equals DeepSeek-V3's rotary embedding at that position (the attention factor applied to both)."""
    scaling = YARN_CONFIGS[name]
    hf_config = deepseek_config(DeepseekV3Config, scaling)
    hf_inv_freq, hf_attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config)
    theta, parsed = _rope({"rope_theta": 10000.0, "rope_scaling": scaling})
    inv_freq, attention_factor = rope_frequencies(64, theta, parsed)
    assert torch.equal(inv_freq, hf_inv_freq) and attention_factor == hf_attention_factor
    assert (attention_factor == 1.0) == (name != "plain")

    positions = random_positions(NUM_TOKENS)
    rope = get_rope(64, MAX_POSITION, theta, parsed, is_neox_style=False)
    hf_cos, hf_sin = hf_deepseek_v3.DeepseekV3RotaryEmbedding(hf_config)(torch.zeros(1), positions[None])
    assert torch.equal(rope.cos_sin_cache[positions], torch.cat([hf_cos[0, :, :32], hf_sin[0, :, :32]], -1))


@pytest.mark.parametrize("name", YARN_CONFIGS)
def test_yarn_softmax_scale_factor_matches_transformers(name: str) -> None:
    """The multiplier of DeepSeek's softmax scale is transformers' ``yarn_apply_mscale`` of a unit scale, and
    ``scale * multiplier`` its value for the real scale up to double rounding (it computes (s * m) * m)."""
    scaling = YARN_CONFIGS[name]
    params = deepseek_config(DeepseekV3Config, scaling).rope_parameters
    multiplier = yarn_softmax_scale_factor(_rope({"rope_theta": 10000.0, "rope_scaling": scaling})[1])
    assert multiplier == hf_deepseek_v3.yarn_apply_mscale(params, 1.0)
    scale = 192**-0.5  # DeepSeek-V3's qk_head_dim: 128 without position + 64 rotated
    assert multiplier * scale == pytest.approx(hf_deepseek_v3.yarn_apply_mscale(params, scale), rel=1e-15)
    assert multiplier == {"deepseek_v3": pytest.approx(1.8738542), "deepseek_v2_lite": pytest.approx(1.5896262),
                          "plain": 1.0}[name]
    assert yarn_softmax_scale_factor(None) == 1.0


# ------------------------------------------------------------------------------------- interleaved (GPT-J) layout


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", [None, "deepseek_v3", "deepseek_v2_lite"])
def test_interleaved_matches_deepseek_v3(name: str | None, dtype: torch.dtype, device: str) -> None:
    """DeepSeek-V3's ``apply_rotary_pos_emb_interleave``, bit for bit up to its output order: it returns the
    rotated pairs de-interleaved (first elements, then second ones), the layer keeps them in place.  Either order
    gives the same q·k, since q and k go through the same layer."""
    scaling = YARN_CONFIGS.get(name)
    hf_config = deepseek_config(DeepseekV3Config, scaling)
    theta, parsed = _rope({"rope_parameters": hf_config.rope_parameters})
    rope = get_rope(64, MAX_POSITION, theta, parsed, is_neox_style=False)
    positions, (q, k) = random_positions(NUM_TOKENS), qk(64, dtype, num_kv_heads=1)
    cos, sin = hf_deepseek_v3.DeepseekV3RotaryEmbedding(hf_config)(q, positions[None])
    hf_q, hf_k = hf_deepseek_v3.apply_rotary_pos_emb_interleave(to_hf(q), to_hf(k), cos, sin)
    for out_q, out_k in rotate(rope, positions, q, k, device):
        assert torch.equal(deinterleave(out_q), from_hf(hf_q)) and torch.equal(deinterleave(out_k), from_hf(hf_k))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", [None, "deepseek_v2_lite"])
def test_interleaved_matches_deepseek_v2(name: str | None, dtype: torch.dtype) -> None:
    """DeepSeek-V2's complex form (``apply_rotary_emb``), same output order as the layer.

    It cannot be matched bit for bit: its cos/sin come from ``torch.polar`` and are scaled as complex numbers,
    its products and sums are fp32 complex multiplication rounded once to the dtype, where the layer (like
    DeepSeek-V3 and Llama) rounds cos/sin, each product and the sum to the dtype.  Per output of a pair (x1, x2),
    with u = eps / 2 the dtype's unit roundoff and m = |x1| + |x2|, the dtype roundings differ by at most
    u|x1| + u|x2| (cos/sin) + um (products) + um (sum) + um (its final rounding) = 4um = 2 eps m.  On top come
    fp32 differences: the two cos/sin implementations (within an ulp of the true value each: 2 u32 m each) and
    the complex product (2 u32 m), 6 u32 m = 3 eps32 m; negligible for bf16, the larger part for fp32.
    """
    scaling = YARN_CONFIGS.get(name)
    hf_config = deepseek_config(DeepseekV2Config, scaling)
    theta, parsed = _rope({"rope_parameters": hf_config.rope_parameters})
    rope = get_rope(64, MAX_POSITION, theta, parsed, is_neox_style=False)
    positions, (q, k) = random_positions(NUM_TOKENS), qk(64, dtype, num_kv_heads=1)
    freqs_cis = hf_deepseek_v2.DeepseekV2RotaryEmbedding(hf_config)(q, positions[None])
    hf_q, hf_k = hf_deepseek_v2.apply_rotary_emb(to_hf(q), to_hf(k), freqs_cis)
    for x, out, expected in zip((q, k), rope(positions, q, k), (from_hf(hf_q), from_hf(hf_k))):
        magnitude = x.float().abs()
        pair_magnitude = (magnitude[..., 0::2] + magnitude[..., 1::2]).repeat_interleave(2, dim=-1)
        error = (out.float() - expected.float()).abs()
        bound = (2 * torch.finfo(dtype).eps + 3 * torch.finfo(torch.float32).eps) * pair_magnitude
        assert (error <= bound).all(), (error / pair_magnitude).max()


def test_interleaved_partial_rotary_passes_the_rest_through() -> None:
    """rotary_dim < head_dim: the first rotary_dim dims are rotated as a head of that size, the rest untouched."""
    positions, (q, k) = random_positions(NUM_TOKENS), qk(96, torch.float32)
    partial = get_rope(96, MAX_POSITION, 10000.0, None, rotary_dim=64, is_neox_style=False)
    full = get_rope(64, MAX_POSITION, 10000.0, None, is_neox_style=False)
    for out, x, expected in zip(partial(positions, q, k), (q, k), full(positions, q[..., :64], k[..., :64])):
        assert torch.equal(out[..., :64], expected) and torch.equal(out[..., 64:], x[..., 64:])


# ------------------------------------------------------------------------------------------------------ M-RoPE


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaling", [None, {"rope_type": "yarn", "factor": 4.0,
                                            "original_max_position_embeddings": 2048}], ids=["default", "yarn"])
def test_mrope_matches_qwen2_vl(scaling: dict[str, Any] | None, dtype: torch.dtype, device: str) -> None:
    """Qwen2-VL's rotary embedding and ``apply_rotary_pos_emb`` with three different position rows, bit for bit,
    through the fused kernel (fed a per-token table) and the torch code."""
    rope_parameters = {**hf_rope_params(scaling, 1000000.0), "mrope_section": MROPE_SECTION}
    hf_config = Qwen2VLTextConfig(hidden_size=512, num_attention_heads=4, max_position_embeddings=MAX_POSITION,
                                  rope_parameters=dict(rope_parameters))
    theta, parsed = _rope({"rope_parameters": rope_parameters})
    rope = get_rope(128, MAX_POSITION, theta, parsed)
    positions = torch.stack([random_positions(NUM_TOKENS, seed=s) for s in (4, 5, 6)])  # [3, num_tokens]
    q, k = qk(128, dtype)
    cos, sin = hf_qwen2_vl.Qwen2VLRotaryEmbedding(hf_config)(q, positions[:, None])
    hf_q, hf_k = hf_qwen2_vl.apply_rotary_pos_emb(to_hf(q), to_hf(k), cos, sin)
    for out_q, out_k in rotate(rope, positions, q, k, device):
        assert torch.equal(out_q, from_hf(hf_q)) and torch.equal(out_k, from_hf(hf_k))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mrope_text_positions_are_plain_rope(dtype: torch.dtype, device: str) -> None:
    """1-D positions, and three equal rows (text tokens), give exactly plain RoPE's result."""
    theta, parsed = _rope(QWEN2_VL_V4)
    mrope, plain = get_rope(128, MAX_POSITION, theta, parsed), get_rope(128, MAX_POSITION, theta, None)
    positions, (q, k) = random_positions(NUM_TOKENS), qk(128, dtype)
    expected = rotate(plain, positions, q, k, device)
    for mrope_positions in (positions, positions.expand(3, -1)):
        for got, want in zip(rotate(mrope, mrope_positions, q, k, device), expected):
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # Triton's interpreter truncates to bf16
def test_mrope_table_through_triton_kernel(dtype: torch.dtype) -> None:
    """The per-token table M-RoPE hands the fused kernels gives the torch code's bits through the Triton kernel
    too, on CPU-only machines under Triton's interpreter (tests/conftest.py chooses it before any import)."""
    from radixlm.kernels import fused_ops

    device = "cuda" if torch.cuda.is_available() else "cpu"
    theta, parsed = _rope(QWEN2_VL_V4)
    rope = get_rope(128, MAX_POSITION, theta, parsed)
    positions = torch.stack([random_positions(NUM_TOKENS, seed=s) for s in (4, 5, 6)])  # [3, num_tokens]
    q, k = qk(128, dtype)
    table, rows = rope.to(device)._angle_rows(positions.to(device))
    got = fused_ops.apply_rotary(q.to(device), k.to(device), rows, table, rope.rotary_dim)
    for out, expected in zip(got, rope.cpu().forward_native(positions, q, k)):
        assert torch.equal(out.cpu(), expected)
