"""Shared fixtures: the embedded model, tiny HF reference models, and radixlm runners built on them."""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Callable

import torch

# Without a GPU the Triton kernels run under Triton's interpreter; it must be chosen before any kernel module
# is imported (the choice is made when a kernel is decorated).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from radixlm.config import ServerArgs
from radixlm.executor import ModelRunner, ModelWorker
from radixlm.models.loader import resolve_model_config

# Keep the CPU tests reproducible and light on a 2-core machine.
torch.set_num_threads(2)


def make_runner(model_path: str | None, **kwargs) -> ModelRunner:
    """A TP=1 runner (CPU unless asked) with a small KV pool, float32 unless asked otherwise (the parity tests compare with HF in
    float32; --dtype auto would serve a bf16 checkpoint such as the embedded model in bf16 on a bf16 CPU)."""
    kwargs.setdefault("max_total_tokens", 4096)
    kwargs.setdefault("random_seed", 0)
    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("device", "cpu")
    args = ServerArgs(model_path=model_path, **kwargs)
    return ModelRunner(args, resolve_model_config(args))


def make_worker(model_path: str | None, **kwargs) -> ModelWorker:
    """``make_runner``'s runner behind the executor contract (``ModelWorker``)."""
    return ModelWorker(make_runner(model_path, **kwargs))


def random_seqs(lengths: tuple[int, ...], seed: int = 1, vocab: int = 1000) -> list[list[int]]:
    """Random token-id sequences of the given lengths (the tiny models' vocabulary by default)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def greedy_req(rid: str, ids: list[int], max_new_tokens: int):
    """A greedy request of exactly ``max_new_tokens`` new tokens (EOS ignored)."""
    from radixlm.core import Req
    from radixlm.sampling import SamplingParams

    sp = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, ignore_eos=True)
    sp.normalize()
    return Req(rid=rid, origin_input_ids=list(ids), sampling_params=sp)


def make_scheduler(model_path: str | None, **kwargs):
    """A scheduler over a fresh TP=1 worker (``kwargs`` are ServerArgs fields; CPU and float32 unless asked)."""
    from radixlm.scheduler import Scheduler

    kwargs.setdefault("random_seed", 0)
    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("device", "cpu")
    args = ServerArgs(model_path=model_path, **kwargs)
    return Scheduler(args, ModelWorker(ModelRunner(args, resolve_model_config(args))))


TINY_CONFIGS = {
    # Llama-3 style: GQA, llama3 rope scaling, untied LM head, vocab not a multiple of 64
    "llama": dict(
        arch="LlamaForCausalLM", vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
        rope_theta=10000.0,
    ),
    "qwen2": dict(
        arch="Qwen2ForCausalLM", vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        rope_theta=1000000.0,
    ),
    "qwen3": dict(
        arch="Qwen3ForCausalLM", vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
        tie_word_embeddings=False, rope_theta=1000000.0,
    ),
    "mistral_sliding": dict(
        arch="MistralForCausalLM", vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512, sliding_window=8,
        tie_word_embeddings=False,
    ),
}


# DeepSeek-V2 (MLA), dense layers only (first_k_dense_replace = num_hidden_layers; MoE layers are not implemented).
# Dims are multiples of 16 (the CPU kernels' vector width), though MLA attention runs the torch-native code anyway.
_MLA = dict(arch="DeepseekV2ForCausalLM", vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
            first_k_dense_replace=2, max_position_embeddings=512)
MLA_CONFIGS = {
    # q_proj straight from the hidden state, plain interleaved RoPE
    "deepseek_v2": dict(_MLA, q_lora_rank=None, tie_word_embeddings=False),
    # q through its own LoRA (q_a_proj, q_a_layernorm, q_b_proj); YaRN with DeepSeek's two mscales, so both
    # corrections are live (the rotary table's mscale / mscale_all_dim and the softmax scale's mscale_all_dim^2);
    # biases on the a-projections and o_proj; tied LM head
    "deepseek_v2_lora_yarn": dict(
        _MLA, q_lora_rank=24, attention_bias=True, tie_word_embeddings=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                         "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
                         "mscale": 0.707, "mscale_all_dim": 1.0},
    ),
}


EMBEDDED_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def copy_embedded_tokenizer(directory: str) -> str:
    """The embedded model's tokenizer files (those it has) into ``directory``, for tiny models over its vocabulary
    (49152 tokens); returns ``directory``."""
    from radixlm.models.embedded import embedded_model_path

    source = embedded_model_path()
    for f in EMBEDDED_TOKENIZER_FILES:
        if os.path.exists(os.path.join(source, f)):
            shutil.copy(os.path.join(source, f), directory)
    return directory


def build_tiny_hf_model(name: str, directory: str, dtype: torch.dtype = torch.float32, seed: int = 0,
                        overrides: dict | None = None, **save_kwargs) -> torch.nn.Module:
    """Instantiate ``TINY_CONFIGS[name]`` (or ``MLA_CONFIGS[name]``, ``MOE_CONFIGS[name]``; ``overrides`` merged
    over it) with random weights in transformers, save it, return the HF model.  MoE routers get spread-out random weights and correction biases
    (HF initialises the bias to zero), so that routing is decisive and its parameters' loading is checked."""
    import transformers

    spec = dict({**TINY_CONFIGS, **MLA_CONFIGS, **MOE_CONFIGS}[name], **(overrides or {}))
    arch = spec.pop("arch")
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    config = config_cls(initializer_range=0.1, **spec)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).to(dtype).eval()
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if param_name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                p.normal_(0.0, 0.5)
        for buffer_name, b in model.named_buffers():
            if buffer_name.endswith("e_score_correction_bias"):
                b.uniform_(-0.2, 0.2)
    model.save_pretrained(directory, **save_kwargs)
    return model


# The checkpoint tensors an FP8 checkpoint holds in E4M3, as DeepSeek-V3 does: every projection of the decoder
# layers (attention, dense MLP, routed experts ``experts.{e}.gate_proj`` / Mixtral's ``w1``, shared experts); the
# routers (``mlp.gate``), norms, embedding and LM head stay in the model dtype.
FP8_CHECKPOINT_WEIGHT = re.compile(r"\.layers\.\d+\..*(proj|proj_with_mqa|\.w[123])\.weight$")


def quantize_fp8_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w`` [n, k] as a block-FP8 checkpoint stores it: (float8_e4m3fn [n, k], float32 scale [ceil(n / bn),
    ceil(k / bk)] = block max / 448, partial edge blocks) and the dequantized weight [n, k] float32."""
    bn, bk = block
    n, k = w.shape
    padded = torch.nn.functional.pad(w.float(), (0, -k % bk, 0, -n % bn))
    blocks = padded.reshape(padded.shape[0] // bn, bn, padded.shape[1] // bk, bk)
    scale = (blocks.abs().amax(dim=(1, 3)) / 448.0).clamp_min(1e-12)  # [n / bn, k / bk]
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
    dequantized = (q.float() * scale[:, None, :, None]).reshape(padded.shape)[:n, :k].contiguous()
    return q.reshape(padded.shape)[:n, :k].contiguous(), scale, dequantized


def build_tiny_fp8_model(name: str, directory: str, block: tuple[int, int] = (16, 16),
                         overrides: dict | None = None) -> torch.nn.Module:
    """``TINY_CONFIGS[name]`` (or an MLA / MoE config) saved as a block-wise FP8 checkpoint (DeepSeek-V3's format:
    the tensors ``FP8_CHECKPOINT_WEIGHT`` matches in float8_e4m3fn with a float32 ``weight_scale_inv`` per
    ``block``, ``quantization_config`` in config.json); returns the reference: the HF model loaded from the same
    checkpoint dequantized (through transformers' own loading, which stacks the per-expert tensors)."""
    import json
    import tempfile

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    build_tiny_hf_model(name, directory, overrides=overrides)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(os.listdir(directory)):
        if f.endswith(".safetensors") or f.endswith(".index.json"):
            if f.endswith(".safetensors"):
                tensors.update(load_file(os.path.join(directory, f)))
            os.remove(os.path.join(directory, f))
    dequantized = dict(tensors)
    for tensor_name, w in list(tensors.items()):
        if FP8_CHECKPOINT_WEIGHT.search(tensor_name):
            tensors[tensor_name], scale, dequantized[tensor_name] = quantize_fp8_blocks(w, block)
            tensors[tensor_name.replace(".weight", ".weight_scale_inv")] = scale
    with tempfile.TemporaryDirectory() as reference_dir:
        save_file(dequantized, os.path.join(reference_dir, "model.safetensors"))
        shutil.copy(os.path.join(directory, "config.json"), reference_dir)
        hf = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32).eval()
    save_file(tensors, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return hf


# Mixture-of-experts models, one per routing family; every config has a dense layer next to its MoE ones.
_MOE_ATTN = dict(vocab_size=1000, hidden_size=64, num_attention_heads=4, max_position_embeddings=512,
                 tie_word_embeddings=False)
MOE_CONFIGS = {
    # softmax, group-limited greedy (4 groups, 2 kept), 2 shared experts, scaled weights; q straight from x
    "deepseek_v2_moe": dict(
        _MLA, q_lora_rank=None, tie_word_embeddings=False, num_hidden_layers=3, first_k_dense_replace=1,
        n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, n_shared_experts=2,
        topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5,
    ),
    # sigmoid + correction bias, grouped top-k (top-2 sums), renormalised, x2.5; q LoRA and YaRN
    "deepseek_v3": dict(
        _MLA, arch="DeepseekV3ForCausalLM", q_lora_rank=24, tie_word_embeddings=False, num_hidden_layers=3,
        first_k_dense_replace=1, n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=32,
        n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                         "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
                         "mscale": 1.0, "mscale_all_dim": 1.0},
    ),
    # softmax top-k renormalised; layer 1 dense (mlp_only_layers); QK-norm attention with GQA
    "qwen3_moe": dict(
        _MOE_ATTN, arch="Qwen3MoeForCausalLM", intermediate_size=128, num_hidden_layers=3, num_key_value_heads=2,
        head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[1], rope_theta=1000000.0,
    ),
    # softmax top-2 of 4 renormalised, every layer MoE, block_sparse_moe / w1 w2 w3 checkpoint names
    "mixtral": dict(
        _MOE_ATTN, arch="MixtralForCausalLM", intermediate_size=48, num_hidden_layers=2, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, rope_theta=1000000.0,
    ),
}


@pytest.fixture
def poisoned_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every floating tensor ``torch.empty``/``empty_like`` returns starts NaN (fp8 included), so an output element
    a kernel fails to write shows up as a mismatch (the kernels allocate their own outputs)."""
    for name in ("empty", "empty_like"):
        monkeypatch.setattr(torch, name, _poisoned(getattr(torch, name)))


def _poisoned(allocate: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def poisoned(*args, **kwargs) -> torch.Tensor:
        t = allocate(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t

    return poisoned


@pytest.fixture(scope="session")
def embedded_path() -> str:
    from radixlm.models.embedded import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="session")
def embedded_tokenizer(embedded_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_path)


@pytest.fixture(scope="session")
def embedded_hf_model(embedded_path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(embedded_path, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def embedded_worker(embedded_path: str) -> ModelWorker:
    return make_worker(embedded_path)


