"""LoRA adapters in PEFT's format, read and checked against the base model they will modify.

An adapter directory holds ``adapter_config.json`` (PEFT's ``LoraConfig``) and ``adapter_model.safetensors`` with,
per modified projection, ``base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_A.weight`` [r, in] and
``...lora_B.weight`` [out, r]; the projection becomes ``W + scaling * B @ A`` with ``scaling = lora_alpha / r``
(``lora_alpha / sqrt(r)`` under rsLoRA).  Only the plain form is served: q/k/v/o/gate/up/down projections, one
rank for all of them, no bias, no DoRA, no extra trained modules.  Anything else is refused by ``LoRAAdapterError``
naming what and why, before any tensor reaches the engine.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from radixlm.config.model_config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PICKLE_WEIGHTS_FILE = "adapter_model.bin"

# The projections an adapter may modify, by the name PEFT gives them, and the block that holds each.
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
SUPPORTED_MODULES = ATTENTION_MODULES + MLP_MODULES
_BLOCK = {**{m: "self_attn" for m in ATTENTION_MODULES}, **{m: "mlp" for m in MLP_MODULES}}

# PEFT's tensor names once ``save_pretrained`` has dropped the adapter name.  The inner ``model.`` is absent when
# the adapter was trained on a bare decoder (``AutoModel``) rather than the causal-LM wrapper.
_TENSOR_NAME = re.compile(
    r"base_model\.model\.(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.([a-z_]+)\.lora_([AB])\.weight")

# LoraConfig fields whose non-default values change the computation in ways this engine does not implement:
# field -> (is it at its default?, why it is refused).
_REFUSED_FIELDS: dict[str, tuple[Any, str]] = {
    "fan_in_fan_out": (lambda v: not v, "fan_in_fan_out adapters (GPT-2 style Conv1D weights) are not supported"),
    "bias": (lambda v: v in (None, "none"), "trained biases (bias != 'none') are not supported"),
    "modules_to_save": (lambda v: not v, "modules_to_save (fully trained extra modules) are not supported"),
    "use_dora": (lambda v: not v, "DoRA adapters (use_dora) are not supported"),
    "lora_bias": (lambda v: not v, "LoRA B biases (lora_bias) are not supported"),
    "rank_pattern": (lambda v: not v, "per-module ranks (rank_pattern) are not supported: one r for all modules"),
    "alpha_pattern": (lambda v: not v, "per-module alphas (alpha_pattern) are not supported"),
    "layer_replication": (lambda v: not v, "layer_replication is not supported"),
    "trainable_token_indices": (lambda v: not v, "trainable_token_indices (embedding rows) are not supported"),
    "target_parameters": (lambda v: not v, "target_parameters (LoRA on raw parameters) are not supported"),
    "alora_invocation_tokens": (lambda v: not v, "activated LoRA (alora_invocation_tokens) is not supported"),
}


class LoRAAdapterError(ValueError):
    """An adapter that cannot be served: the message says which adapter, what is wrong and, where it helps, why."""


@dataclass(frozen=True)
class LoRAConfig:
    """What the engine uses of PEFT's ``adapter_config.json``.  ``target_modules`` is as written: a list of
    module names, or a regex string matched against full module names.  ``lora_dropout`` is training-only."""

    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...] | str

    @property
    def scaling(self) -> float:
        """The factor on ``B @ A``: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` under rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def targets(self, module: str) -> bool:
        """Whether a list ``target_modules`` names ``module`` (PEFT's rule: the full module name equals an
        entry or ends in ``.entry``; ``all-linear`` names every projection).  A regex string is taken as naming
        what the weights file holds: the file is the authority on which modules were trained."""
        if isinstance(self.target_modules, str):
            return True
        return any(t == "all-linear" or t.rsplit(".", 1)[-1] == module for t in self.target_modules)

    @classmethod
    def from_dict(cls, name: str, raw: dict[str, Any]) -> "LoRAConfig":
        """Parse and check a config dict (LoRAAdapterError for anything not servable)."""
        peft_type = raw.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise LoRAAdapterError(f"LoRA adapter {name!r}: peft_type is {peft_type!r}; only LORA is supported")
        for key, (is_default, why) in _REFUSED_FIELDS.items():
            if not is_default(raw.get(key)):
                raise LoRAAdapterError(f"LoRA adapter {name!r}: {why} ({key}={raw[key]!r})")
        r = raw.get("r")
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise LoRAAdapterError(f"LoRA adapter {name!r}: r must be a positive integer; got {r!r}")
        alpha = raw.get("lora_alpha", 8)
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            raise LoRAAdapterError(f"LoRA adapter {name!r}: lora_alpha must be a number; got {alpha!r}")
        targets = raw.get("target_modules")
        if isinstance(targets, str):
            target_modules: tuple[str, ...] | str = targets
        elif isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
            target_modules = tuple(sorted(targets))
            for t in target_modules:
                if t != "all-linear" and t.rsplit(".", 1)[-1] not in SUPPORTED_MODULES:
                    raise LoRAAdapterError(f"LoRA adapter {name!r}: unsupported target module {t!r}; supported: "
                                           f"{', '.join(SUPPORTED_MODULES)}")
        else:
            raise LoRAAdapterError(f"LoRA adapter {name!r}: target_modules must be a non-empty list of module "
                                   f"names or a regex string; got {targets!r}")
        return cls(r=r, lora_alpha=float(alpha), use_rslora=bool(raw.get("use_rslora", False)),
                   target_modules=target_modules)


@dataclass(frozen=True)
class LoRAAdapter:
    """A loaded adapter: ``weights[(layer, module)] = (A [r, in], B [out, r])`` on CPU in one dtype, for every
    projection it modifies (``module`` in ``SUPPORTED_MODULES``; layers it leaves alone have no entry)."""

    name: str
    config: LoRAConfig
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def rank(self) -> int:
        return self.config.r

    @property
    def scaling(self) -> float:
        return self.config.scaling

    @property
    def target_modules(self) -> frozenset[str]:
        """The module names this adapter modifies in at least one layer."""
        return frozenset(module for _, module in self.weights)


def projection_shape(model_config: ModelConfig, module: str) -> tuple[int, int]:
    """(out_features, in_features) of the full (unsharded) base projection ``module``."""
    hidden, head_dim = model_config.hidden_size, model_config.head_dim
    q, kv = model_config.num_attention_heads * head_dim, model_config.num_key_value_heads * head_dim
    inter = model_config.intermediate_size
    return {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q),
            "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}[module]


def load_lora_adapter(name: str, path: str, model_config: ModelConfig, *, max_rank: int,
                      allowed_modules: frozenset[str] | set[str] | None = None, allowed_dir: str | None = None,
                      dtype: torch.dtype = torch.float32) -> LoRAAdapter:
    """Read the PEFT adapter at ``path``, check it against the base model and the server's limits, and return it
    with its tensors in ``dtype`` on CPU.

    ``max_rank``: the largest r served (``--max-lora-rank``); ``allowed_modules``: the modules adapters may modify
    (``--lora-target-modules``; None: all of ``SUPPORTED_MODULES``); ``allowed_dir``: where adapters may live
    (symlinks resolved, so a link cannot point outside it).  Raises LoRAAdapterError, the server's cue to refuse
    this adapter and stay up."""
    files = _resolve_files(name, path, allowed_dir)
    config = _read_config(name, files[CONFIG_FILE])
    if config.r > max_rank:
        raise LoRAAdapterError(f"LoRA adapter {name!r}: rank {config.r} is above the server's max LoRA rank "
                               f"{max_rank} (--max-lora-rank)")
    tensors = _read_safetensors(name, files[WEIGHTS_FILE])
    weights = _pair_tensors(name, tensors, config.r, model_config)
    untargeted = sorted({module for _, module in weights if not config.targets(module)})
    if untargeted:
        raise LoRAAdapterError(f"LoRA adapter {name!r} has weights for {', '.join(untargeted)}, which its "
                               f"target_modules {list(config.target_modules)!r} do not name")
    allowed = frozenset(SUPPORTED_MODULES if allowed_modules is None else allowed_modules)
    refused = sorted({module for _, module in weights} - allowed)
    if refused:
        raise LoRAAdapterError(f"LoRA adapter {name!r} modifies {', '.join(refused)}, outside the server's LoRA "
                               f"target modules ({', '.join(sorted(allowed))}; --lora-target-modules)")
    return LoRAAdapter(name=name, config=config,
                       weights={key: (a.to(dtype).contiguous(), b.to(dtype).contiguous())
                                for key, (a, b) in sorted(weights.items())})


def read_lora_config(name: str, path: str, allowed_dir: str | None = None) -> LoRAConfig:
    """The checked ``adapter_config.json`` of the adapter at ``path`` (its files checked like
    ``load_lora_adapter``'s; the weights are not read): what the server needs to size its pool before loading."""
    return _read_config(name, _resolve_files(name, path, allowed_dir)[CONFIG_FILE])


def _read_config(name: str, fpath: str) -> LoRAConfig:
    with open(fpath) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise LoRAAdapterError(f"LoRA adapter {name!r}: {CONFIG_FILE} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise LoRAAdapterError(f"LoRA adapter {name!r}: {CONFIG_FILE} is not a JSON object")
    return LoRAConfig.from_dict(name, raw)


def _resolve_files(name: str, path: str, allowed_dir: str | None) -> dict[str, str]:
    """The two adapter files' real paths, checked to exist and to lie inside ``allowed_dir``."""
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        raise LoRAAdapterError(f"LoRA adapter {name!r}: {path!r} is not a directory")
    found: dict[str, str] = {}
    for fname in (CONFIG_FILE, WEIGHTS_FILE):
        fpath = os.path.realpath(os.path.join(real, fname))
        if not os.path.isfile(fpath):
            if fname == WEIGHTS_FILE and os.path.exists(os.path.join(real, _PICKLE_WEIGHTS_FILE)):
                raise LoRAAdapterError(
                    f"LoRA adapter {name!r}: {path!r} has {_PICKLE_WEIGHTS_FILE} but no {WEIGHTS_FILE}; only "
                    f"safetensors are loaded, because a .bin is a pickle and unpickling can run arbitrary code. "
                    f"Re-save it with PEFT's save_pretrained(..., safe_serialization=True)")
            raise LoRAAdapterError(f"LoRA adapter {name!r}: {path!r} has no {fname}")
        found[fname] = fpath
    if allowed_dir is not None:
        root = os.path.realpath(allowed_dir)
        for fpath in (real, *found.values()):
            if os.path.commonpath([root, fpath]) != root:
                raise LoRAAdapterError(f"LoRA adapter {name!r}: {path!r} resolves to {fpath!r}, outside the "
                                       f"allowed adapter directory {root!r}")
    return found


def _read_safetensors(name: str, fpath: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(fpath)
    except (SafetensorError, OSError) as e:
        raise LoRAAdapterError(f"LoRA adapter {name!r}: cannot read {WEIGHTS_FILE}: {e}") from None


def _pair_tensors(name: str, tensors: dict[str, torch.Tensor], r: int,
                  model_config: ModelConfig) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """PEFT tensor names -> {(layer, module): (A, B)}, each tensor checked for name, shape and finiteness."""
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for tname, t in tensors.items():
        m = _TENSOR_NAME.fullmatch(tname)
        if m is None:
            raise LoRAAdapterError(f"LoRA adapter {name!r}: unexpected tensor {tname!r}; only LoRA A/B weights of "
                                   f"the decoder layers' {', '.join(SUPPORTED_MODULES)} are supported")
        layer, block, module, half = int(m[1]), m[2], m[3], m[4]
        if _BLOCK.get(module) != block:
            raise LoRAAdapterError(f"LoRA adapter {name!r}: tensor {tname!r} targets unsupported module "
                                   f"{block}.{module}; supported: {', '.join(SUPPORTED_MODULES)}")
        if layer >= model_config.num_hidden_layers:
            raise LoRAAdapterError(f"LoRA adapter {name!r}: tensor {tname!r} is for layer {layer}, but the base "
                                   f"model has {model_config.num_hidden_layers} layers")
        out_features, in_features = projection_shape(model_config, module)
        expected = (r, in_features) if half == "A" else (out_features, r)
        if tuple(t.shape) != expected:
            raise LoRAAdapterError(f"LoRA adapter {name!r}: tensor {tname!r} has shape {tuple(t.shape)}; the base "
                                   f"model's {module} with r={r} needs {expected}")
        if not t.is_floating_point():
            raise LoRAAdapterError(f"LoRA adapter {name!r}: tensor {tname!r} has dtype {t.dtype}, not a float")
        if not bool(torch.isfinite(t).all()):
            raise LoRAAdapterError(f"LoRA adapter {name!r}: tensor {tname!r} holds non-finite values (inf/nan)")
        halves.setdefault((layer, module), {})[half] = t
    if not halves:
        raise LoRAAdapterError(f"LoRA adapter {name!r}: {WEIGHTS_FILE} holds no LoRA weights")
    pairs: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for (layer, module), ab in halves.items():
        if len(ab) != 2:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise LoRAAdapterError(f"LoRA adapter {name!r}: layer {layer} {module} has no {missing} weight "
                                   f"(A and B come in pairs)")
        pairs[(layer, module)] = (ab["A"], ab["B"])
    return pairs
