"""Unit tests for radixlm.config: ServerArgs validation and CLI, ModelConfig.from_hf over both config dialects."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from radixlm.config import ModelConfig, ServerArgs
from radixlm.utils import cpu_features
from radixlm.utils.toolchain import cpu_kernels_buildable

# ----------------------------------------------------------------------------------------------------- ServerArgs


def parse(argv: list[str]) -> ServerArgs:
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return ServerArgs.from_cli_args(parser.parse_args(argv))


def test_server_args_defaults_valid_and_resolved() -> None:
    """ServerArgs() is valid; auto device/backend and the random seed are resolved once, at construction."""
    args = ServerArgs()
    assert args.model_path is None
    assert args.device == ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        assert args.attention_backend == "triton"
    else:
        assert args.attention_backend == ("cpu" if cpu_kernels_buildable() else "torch_native")
    assert isinstance(args.random_seed, int) and 0 <= args.random_seed <= 2**30
    assert args.tp_size == 1 and args.page_size == 1
    assert args.dtype == "auto" and args.load_format == "auto"
    assert args.chunked_prefill_size == 8192 and args.max_prefill_tokens == 16384
    assert args.schedule_policy == "fcfs" and args.disable_radix_cache is False
    assert args.mem_fraction_static is None and args.max_total_tokens is None
    assert args.port == 30000


def test_server_args_device_auto_is_cpu_without_cuda() -> None:
    """On a machine without CUDA, device auto resolves to cpu and an explicit cuda is rejected."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert ServerArgs(device="auto").device == "cpu"
    with pytest.raises(ValueError, match="--device cuda"):
        ServerArgs(device="cuda")


def test_server_args_explicit_seed_kept() -> None:
    """An explicit random_seed is kept as is (0 included), and replace() keeps the resolved seed."""
    assert ServerArgs(random_seed=0).random_seed == 0
    args = ServerArgs(random_seed=123)
    again = args.replace(tp_size=1, page_size=16)
    assert again.random_seed == 123 and again.page_size == 16 and args.page_size == 1


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"tp_size": 0}, "--tp-size"),
        ({"dp_size": 0}, "--dp-size"),
        ({"dp_size": 2, "nnodes": 2, "dist_init_addr": "h:5000"}, "--dp-size"),  # replicas span one node
        ({"base_gpu_id": -1}, "--base-gpu-id"),
        ({"tp_size": 4, "dp_size": 3, "enable_dp_attention": True}, "--dp-size"),
        ({"page_size": 3}, "--page-size"),
        ({"page_size": 0}, "--page-size"),
        ({"page_size": 24}, "--page-size"),
        ({"mem_fraction_static": 0.0}, "--mem-fraction-static"),
        ({"mem_fraction_static": 1.0}, "--mem-fraction-static"),
        ({"mem_fraction_static": 1.5}, "--mem-fraction-static"),
        ({"max_total_tokens": 0}, "--max-total-tokens"),
        ({"context_length": 0}, "--context-length"),
        ({"max_running_requests": 0}, "--max-running-requests"),
        ({"max_prefill_tokens": 0}, "--max-prefill-tokens"),
        ({"chunked_prefill_size": 0}, "--chunked-prefill-size"),
        ({"chunked_prefill_size": -2}, "--chunked-prefill-size"),
        ({"schedule_conservativeness": 0.0}, "--schedule-conservativeness"),
        ({"port": 0}, "--port"),
        ({"port": 65536}, "--port"),
        ({"schedule_policy": "foo"}, "--schedule-policy"),
        ({"load_format": "pt"}, "--load-format"),
        ({"dtype": "int8"}, "--dtype"),
        ({"device": "tpu"}, "--device"),
        ({"attention_backend": "flashinfer"}, "--attention-backend"),
        ({"log_level": "verbose"}, "--log-level"),
    ],
)
def test_server_args_invalid_value_names_flag(kwargs: dict[str, Any], flag: str) -> None:
    """Each invalid value raises ValueError whose message names the offending SGLang flag and the value."""
    with pytest.raises(ValueError) as exc:
        ServerArgs(**kwargs)
    msg = str(exc.value)
    assert flag in msg
    assert str(next(iter(kwargs.values()))) in msg


@pytest.mark.parametrize(
    "kwargs",
    [
        {"page_size": 64},
        {"chunked_prefill_size": -1},
        {"mem_fraction_static": 0.5},
        {"schedule_policy": "lpm"},
        {"port": 65535},
        {"max_total_tokens": 1, "context_length": 1, "max_running_requests": 1},
    ],
)
def test_server_args_boundary_values_valid(kwargs: dict[str, Any]) -> None:
    """Values at the edge of each valid range are accepted unchanged."""
    args = ServerArgs(**kwargs)
    for name, value in kwargs.items():
        assert getattr(args, name) == value


def test_dp_attention_args() -> None:
    """--enable-dp-attention takes a --dp-size >= 2 dividing --tp-size; the flags parse under SGLang's names."""
    with pytest.raises(ValueError, match="--enable-dp-attention needs --dp-size"):
        ServerArgs(tp_size=2, enable_dp_attention=True)
    args = parse(["--tp-size", "4", "--dp-size", "2", "--enable-dp-attention"])
    assert (args.tp_size, args.dp_size, args.enable_dp_attention) == (4, 2, True)
    assert ServerArgs(tp_size=4, dp_size=4, enable_dp_attention=True).dp_size == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nnodes": 0}, "--nnodes must be >= 1, got 0"),
        ({"tp_size": 2, "nnodes": 2, "node_rank": 2, "dist_init_addr": "h:1"}, "--node-rank must be in 0..1"),
        ({"tp_size": 2, "nnodes": 2, "node_rank": -1, "dist_init_addr": "h:1"}, "--node-rank must be in 0..1"),
        ({"tp_size": 3, "nnodes": 2, "dist_init_addr": "h:1"}, "--tp-size 3 must be divisible by --nnodes 2"),
        ({"tp_size": 2, "nnodes": 2}, "--nnodes 2 needs --dist-init-addr"),
        ({"dist_init_addr": "node0"}, "--dist-init-addr must be host:port"),
        ({"dist_init_addr": "node0:65535"}, "--dist-init-addr must be host:port"),
    ],
)
def test_multi_node_args_are_checked(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServerArgs(**kwargs)


def test_multi_node_args_parse_and_place_the_ranks() -> None:
    """SGLang's flags; node k holds TP ranks [k * tp / nnodes, (k + 1) * tp / nnodes)."""
    args = parse(["--tp-size", "8", "--nnodes", "2", "--node-rank", "1", "--dist-init-addr", "[fd00::1]:5000"])
    assert (args.nnodes, args.node_rank, args.tp_size_per_node) == (2, 1, 4)
    assert list(args.local_tp_ranks()) == [4, 5, 6, 7]
    assert list(ServerArgs(tp_size=4).local_tp_ranks()) == [0, 1, 2, 3]


def test_dp_attention_needs_an_mla_model(tmp_path: Path) -> None:
    """A model without latent attention is refused with the flag named; an MLA config is accepted."""
    from radixlm.models.loader import resolve_model_config

    args = ServerArgs(model_path=write_model_dir(tmp_path / "llama", base_config()), tp_size=2, dp_size=2,
                      enable_dp_attention=True, device="cpu")
    with pytest.raises(ValueError, match="--enable-dp-attention applies to MLA models.*LlamaForCausalLM"):
        resolve_model_config(args)
    mla = base_config(architectures=["DeepseekV2ForCausalLM"], kv_lora_rank=32, q_lora_rank=None,
                      qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16)
    resolve_model_config(args.replace(model_path=write_model_dir(tmp_path / "mla", mla)))


def test_server_args_reports_all_problems_at_once() -> None:
    """Several invalid values are reported together in one ValueError."""
    with pytest.raises(ValueError) as exc:
        ServerArgs(tp_size=0, page_size=3, chunked_prefill_size=0, schedule_policy="foo", port=-1)
    msg = str(exc.value)
    for flag in ("--tp-size", "--page-size", "--chunked-prefill-size", "--schedule-policy", "--port"):
        assert flag in msg
    assert "--mem-fraction-static" not in msg


def test_server_args_frozen() -> None:
    """Fields cannot be reassigned after construction."""
    args = ServerArgs()
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.tp_size = 2  # type: ignore[misc]


def test_cli_every_field_has_sglang_flag() -> None:
    """add_cli_args defines one --kebab-case flag per field, with the field name as dest."""
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    dests = {a.dest: a.option_strings for a in parser._actions}
    for f in dataclasses.fields(ServerArgs):
        assert dests[f.name] == ["--" + f.name.replace("_", "-")]


def test_cli_round_trip() -> None:
    """SGLang flags parse to the right typed values."""
    args = parse([
        "--model-path", "/models/x", "--tp-size", "2", "--mem-fraction-static", "0.7",
        "--max-total-tokens", "4096", "--context-length", "2048", "--page-size", "16",
        "--random-seed", "42", "--disable-radix-cache", "--schedule-policy", "lpm",
        "--chunked-prefill-size", "-1", "--dtype", "bfloat16", "--load-format", "dummy",
    ])
    assert args.model_path == "/models/x"
    assert args.tp_size == 2 and isinstance(args.tp_size, int)
    assert args.mem_fraction_static == 0.7 and isinstance(args.mem_fraction_static, float)
    assert args.max_total_tokens == 4096 and args.context_length == 2048
    assert args.page_size == 16 and args.random_seed == 42
    assert args.disable_radix_cache is True
    assert args.schedule_policy == "lpm" and args.chunked_prefill_size == -1
    assert args.dtype == "bfloat16" and args.load_format == "dummy"


def test_cli_defaults_match_dataclass() -> None:
    """No flags gives the dataclass defaults (the seed is resolved to an int)."""
    args = parse([])
    defaults = ServerArgs(random_seed=args.random_seed)
    assert args == defaults
    assert isinstance(args.random_seed, int)
    assert args.disable_radix_cache is False


def test_cli_bare_model_path_means_embedded() -> None:
    """A bare --model-path (no value) means None, i.e. the embedded model."""
    assert parse(["--model-path"]).model_path is None
    assert parse(["--model-path", "--port", "31000"]).port == 31000
    assert parse(["--model-path", "--port", "31000"]).model_path is None


def test_cli_rejects_bad_choice_and_type() -> None:
    """argparse rejects choices and types it knows before ServerArgs is built."""
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--schedule-policy", "foo"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--tp-size", "two"])


def test_cli_validation_still_applies() -> None:
    """Values argparse accepts but ServerArgs forbids raise the same ValueError."""
    with pytest.raises(ValueError, match="--page-size"):
        parse(["--page-size", "3"])


# ----------------------------------------------------------------------------------------------------- ModelConfig

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


def base_config(**overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "eos_token_id": 2, "bos_token_id": 1,
    }
    cfg.update(overrides)
    return {k: v for k, v in cfg.items() if v is not None}


def write_model_dir(path: Path, config: dict[str, Any], generation: dict[str, Any] | None = None) -> str:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if generation is not None:
        (path / "generation_config.json").write_text(json.dumps(generation))
    return str(path)


def test_model_config_basic_fields(tmp_path: Path) -> None:
    """Architecture fields are read as written; head_dim defaults to hidden/heads; context defaults to max_pos."""
    cfg = ModelConfig.from_hf(write_model_dir(tmp_path, base_config()))
    assert cfg.model_path == str(tmp_path)
    assert cfg.architecture == "LlamaForCausalLM"
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (300, 64, 128)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 4, 2)
    assert cfg.head_dim == 16
    assert cfg.rms_norm_eps == 1e-5
    assert cfg.max_position_embeddings == 256 and cfg.context_length == 256
    assert cfg.tie_word_embeddings is False and cfg.attention_bias is False
    assert cfg.sliding_window is None and cfg.hidden_act == "silu"
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,)
    assert cfg.hf_config["vocab_size"] == 300


def test_model_config_explicit_head_dim_and_kv_default(tmp_path: Path) -> None:
    """An explicit head_dim wins over hidden/heads; missing num_key_value_heads means MHA."""
    cfg = ModelConfig.from_hf(write_model_dir(tmp_path, base_config(head_dim=32, num_key_value_heads=None)))
    assert cfg.head_dim == 32
    assert cfg.num_key_value_heads == 4


def test_rope_llama3_both_dialects_agree(tmp_path: Path) -> None:
    """transformers-4 rope_theta+rope_scaling and transformers-5 rope_parameters give the same rope."""
    v4 = ModelConfig.from_hf(write_model_dir(
        tmp_path / "v4", base_config(rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING))))
    v5 = ModelConfig.from_hf(write_model_dir(
        tmp_path / "v5", base_config(rope_parameters={**LLAMA3_SCALING, "rope_theta": 500000.0})))
    for cfg in (v4, v5):
        assert cfg.rope_theta == 500000.0 and isinstance(cfg.rope_theta, float)
        assert cfg.rope_scaling == LLAMA3_SCALING
    assert v4 == dataclasses.replace(v5, model_path=v4.model_path)


@pytest.mark.parametrize(
    "rope_fields",
    [
        {},
        {"rope_theta": 1000000.0},
        {"rope_theta": 1000000.0, "rope_scaling": None},
        {"rope_theta": 1000000.0, "rope_scaling": {"rope_type": "default"}},
        {"rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}},
    ],
)
def test_rope_default_means_no_scaling(tmp_path: Path, rope_fields: dict[str, Any]) -> None:
    """Plain RoPE in either dialect gives rope_scaling None; theta defaults to 10000."""
    cfg = ModelConfig.from_hf(write_model_dir(tmp_path, {**base_config(), **rope_fields}))
    assert cfg.rope_scaling is None
    assert cfg.rope_theta == (1000000.0 if rope_fields else 10000.0)


def test_rope_legacy_type_key(tmp_path: Path) -> None:
    """An old-style rope_scaling with "type" instead of "rope_type" is recognised."""
    cfg = ModelConfig.from_hf(write_model_dir(
        tmp_path, base_config(rope_scaling={"type": "linear", "factor": 2.0})))
    assert cfg.rope_scaling is not None
    assert cfg.rope_scaling["rope_type"] == "linear" and cfg.rope_scaling["factor"] == 2.0


def test_rope_from_real_transformers_config(tmp_path: Path) -> None:
    """A config.json written by the installed transformers (whatever its dialect) reads back the same rope."""
    import transformers

    hf = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING))
    hf.architectures = ["LlamaForCausalLM"]
    hf.save_pretrained(tmp_path)
    cfg = ModelConfig.from_hf(str(tmp_path))
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == LLAMA3_SCALING


def test_eos_ids_merged_without_duplicates(tmp_path: Path) -> None:
    """generation_config.json's eos list comes first, then config.json's id, each id once."""
    path = write_model_dir(tmp_path, base_config(eos_token_id=7), generation={"eos_token_id": [5, 7, 5]})
    assert ModelConfig.from_hf(path).eos_token_ids == (5, 7)


def test_eos_ids_config_only_and_list(tmp_path: Path) -> None:
    """Without generation_config.json the config's eos (list or int) is used; none at all gives ()."""
    assert ModelConfig.from_hf(write_model_dir(tmp_path / "a", base_config(eos_token_id=[9, 3]))).eos_token_ids \
        == (9, 3)
    path = write_model_dir(tmp_path / "b", base_config(eos_token_id=None), generation={"eos_token_id": 4})
    assert ModelConfig.from_hf(path).eos_token_ids == (4,)
    assert ModelConfig.from_hf(write_model_dir(tmp_path / "c", base_config(eos_token_id=None))).eos_token_ids == ()


BF16, FP16, F32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize(
    ("ckpt_fields", "expected"),
    [
        ({"torch_dtype": "bfloat16"}, BF16),
        ({"torch_dtype": "float16"}, FP16),
        ({"torch_dtype": "float32"}, BF16),
        ({"dtype": "float16"}, FP16),  # transformers-5 key
        ({"dtype": "float32"}, BF16),
        ({}, BF16),
    ],
)
def test_dtype_auto_on_gpu(tmp_path: Path, ckpt_fields: dict[str, Any], expected: torch.dtype) -> None:
    """dtype auto on GPU: the checkpoint's half dtype; float32 (or undeclared) checkpoints served in bf16."""
    path = write_model_dir(tmp_path, {**base_config(), **ckpt_fields})
    assert ModelConfig.from_hf(path, dtype="auto", device="cuda").dtype == expected


@pytest.mark.parametrize(
    ("ckpt_fields", "native", "expected"),
    [
        ({"torch_dtype": "bfloat16"}, {BF16}, BF16),  # e.g. avx512_bf16 or amx_bf16
        ({"torch_dtype": "bfloat16"}, {BF16, FP16}, BF16),
        ({"torch_dtype": "bfloat16"}, set(), F32),  # bf16 emulated: float32 is faster
        ({"torch_dtype": "bfloat16"}, {FP16}, F32),
        ({"dtype": "bfloat16"}, {BF16}, BF16),  # transformers-5 key
        ({"torch_dtype": "float16"}, {FP16}, FP16),  # e.g. avx512_fp16 or amx_fp16
        ({"torch_dtype": "float16"}, {BF16}, F32),
        ({"torch_dtype": "float32"}, {BF16, FP16}, F32),
        ({}, {BF16, FP16}, F32),  # undeclared means float32 (transformers' default)
    ],
)
def test_dtype_auto_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ckpt_fields: dict[str, Any],
                           native: set[torch.dtype], expected: torch.dtype) -> None:
    """dtype auto on CPU: a bf16/fp16 checkpoint keeps its dtype where the CPU has it natively, else float32."""
    monkeypatch.setattr(cpu_features, "native_half_dtypes", lambda: frozenset(native))
    path = write_model_dir(tmp_path, {**base_config(), **ckpt_fields})
    assert ModelConfig.from_hf(path, dtype="auto", device="cpu").dtype == expected


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("fpu sse avx2 avx512f avx512_bf16", {BF16}),
        ("fpu avx512f amx_bf16 amx_tile", {BF16}),
        ("fpu avx512f avx512_bf16 avx512_fp16", {BF16, FP16}),
        ("fpu avx512f amx_fp16", {FP16}),
        ("fpu sse avx2 f16c", set()),  # f16c only converts
    ],
)
def test_native_half_dtypes_from_cpu_flags(monkeypatch: pytest.MonkeyPatch, flags: str,
                                           expected: set[torch.dtype]) -> None:
    """The CPU's bf16/fp16 arithmetic is read from its /proc/cpuinfo flags."""
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: tuple(flags.split()))
    cpu_features.native_half_dtypes.cache_clear()
    try:
        assert cpu_features.native_half_dtypes() == expected
    finally:
        cpu_features.native_half_dtypes.cache_clear()


@pytest.mark.parametrize(
    ("name", "expected"),
    [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16),
     ("half", torch.float16), ("float", torch.float32)],
)
def test_dtype_explicit(tmp_path: Path, name: str, expected: torch.dtype) -> None:
    """An explicit dtype is used on any device, whatever the checkpoint's."""
    path = write_model_dir(tmp_path, base_config(torch_dtype="bfloat16"))
    assert ModelConfig.from_hf(path, dtype=name, device="cpu").dtype == expected
    assert ModelConfig.from_hf(path, dtype=name, device="cuda").dtype == expected


def test_dtype_invalid(tmp_path: Path) -> None:
    """An unknown dtype raises ValueError naming --dtype, the bad value and the valid ones."""
    with pytest.raises(ValueError) as exc:
        ModelConfig.from_hf(write_model_dir(tmp_path, base_config()), dtype="int8")
    msg = str(exc.value)
    assert "--dtype" in msg and "'int8'" in msg and "bfloat16" in msg and "float16" in msg


def test_context_length(tmp_path: Path) -> None:
    """context_length up to max_position_embeddings is honoured; beyond it raises a ValueError naming both."""
    path = write_model_dir(tmp_path, base_config())
    assert ModelConfig.from_hf(path, context_length=128).context_length == 128
    assert ModelConfig.from_hf(path, context_length=256).context_length == 256
    with pytest.raises(ValueError) as exc:
        ModelConfig.from_hf(path, context_length=257)
    msg = str(exc.value)
    assert "--context-length 257" in msg and "max_position_embeddings 256" in msg


def test_missing_architectures_raises(tmp_path: Path) -> None:
    """config.json without 'architectures' (or with an empty list) is rejected."""
    with pytest.raises(ValueError, match="architectures"):
        ModelConfig.from_hf(write_model_dir(tmp_path / "a", base_config(architectures=None)))
    with pytest.raises(ValueError, match="architectures"):
        ModelConfig.from_hf(write_model_dir(tmp_path / "b", base_config(architectures=[])))


def test_missing_config_json(tmp_path: Path) -> None:
    """A directory with no config.json raises FileNotFoundError naming the path."""
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_hf(str(tmp_path))


def test_hf_config_dict_instead_of_file(tmp_path: Path) -> None:
    """hf_config= bypasses config.json but generation_config.json in model_path still adds eos ids."""
    path = write_model_dir(tmp_path, base_config(vocab_size=999), generation={"eos_token_id": [11]})
    cfg = ModelConfig.from_hf(path, hf_config=base_config(eos_token_id=2))
    assert cfg.vocab_size == 300
    assert cfg.eos_token_ids == (11, 2)


def test_sliding_window(tmp_path: Path) -> None:
    """sliding_window is read, and use_sliding_window=false (Qwen2) turns it off."""
    on = ModelConfig.from_hf(write_model_dir(tmp_path / "a", base_config(sliding_window=64)))
    off = ModelConfig.from_hf(write_model_dir(tmp_path / "b", base_config(sliding_window=64,
                                                                        use_sliding_window=False)))
    assert on.sliding_window == 64 and off.sliding_window is None



def test_cpu_attention_backend_needs_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the C kernels turned off, auto falls back to torch_native on CPU and an explicit ``cpu`` is refused."""
    monkeypatch.setenv("RADIXLM_DISABLE_CPU_KERNELS", "1")
    assert ServerArgs(device="cpu").attention_backend == "torch_native"
    with pytest.raises(ValueError, match="--attention-backend cpu needs"):
        ServerArgs(device="cpu", attention_backend="cpu")


@pytest.mark.parametrize("cc", [None, "no-such-compiler"])
def test_cpu_attention_backend_needs_a_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                cc: str | None) -> None:
    """No C compiler on PATH (or $CC naming none): auto is torch_native on CPU and an explicit ``cpu`` is refused."""
    monkeypatch.delenv("RADIXLM_DISABLE_CPU_KERNELS", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    if cc is None:
        monkeypatch.delenv("CC", raising=False)
    else:
        monkeypatch.setenv("CC", cc)
    assert ServerArgs(device="cpu").attention_backend == "torch_native"
    with pytest.raises(ValueError, match="--attention-backend cpu needs"):
        ServerArgs(device="cpu", attention_backend="cpu")


def test_cpu_attention_backend_auto_with_a_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A compiler on PATH makes auto the C kernels on CPU, decided without running it (a stub that would fail is
    never called: constructing ServerArgs compiles nothing)."""
    stub = tmp_path / "cc"
    stub.write_text("#!/bin/sh\necho called >> \"$0.log\"\nexit 1\n")
    stub.chmod(0o755)
    monkeypatch.delenv("RADIXLM_DISABLE_CPU_KERNELS", raising=False)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert ServerArgs(device="cpu").attention_backend == "cpu"
    assert ServerArgs(device="cpu", attention_backend="cpu").attention_backend == "cpu"
    assert not (tmp_path / "cc.log").exists()
