"""Where weights come from (safetensors files or a seeded random generator) and how they reach parameters.

Every tensor goes through its parameter's ``weight_loader``, which shards it for this TP rank; dummy weights
are generated in checkpoint layout (one generator seed per full tensor), so they are identical for every
tensor-parallel size.
"""

from __future__ import annotations

import glob
import json
import os
import zlib
from collections.abc import Iterable, Iterator

import torch
from safetensors import safe_open
from torch import nn

from radixlm.layers.linear import default_weight_loader


def safetensors_files(model_path: str) -> list[str]:
    """The checkpoint files of a model directory (sharded via ``model.safetensors.index.json`` or not)."""
    index = os.path.join(model_path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(model_path, n) for n in names]
    else:
        files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_path!r} (use --load-format dummy for random weights)")
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"checkpoint shards listed in the index are missing: {missing}")
    return files


def iter_safetensors(model_path: str) -> Iterator[tuple[str, torch.Tensor]]:
    for path in safetensors_files(model_path):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_named_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    stacked_params_mapping: list[tuple[str, str, object]],
    skip: tuple[str, ...] = (),
) -> None:
    """Route checkpoint tensors to parameters; raise if a tensor has no home or a parameter got no tensor.

    ``stacked_params_mapping`` entries ``(param_part, ckpt_part, shard_id)`` send a checkpoint tensor whose name
    contains ``.{ckpt_part}.`` (the name's end counts as a dot, so a part may end with the leaf, as in
    ``experts.3.w1.weight``) to the parameter named with ``param_part`` instead, as shard ``shard_id``; the
    first matching entry wins."""
    params = dict(model.named_parameters())
    expected = {(name, shard) for name, p in params.items() for shard in _shard_ids(p)}
    loaded: set[tuple[str, object]] = set()
    unexpected = []
    for name, tensor in weights:
        if any(name.endswith(s) for s in skip):
            continue
        target, shard = name, None
        for param_part, ckpt_part, shard_id in stacked_params_mapping:
            if f".{ckpt_part}." in f"{name}.":
                target, shard = f"{name}.".replace(f".{ckpt_part}.", f".{param_part}.", 1)[:-1], shard_id
                break
        param = params.get(target)
        if param is None:
            unexpected.append(name)
            continue
        full_shape = (getattr(param, "checkpoint_shapes", None) or {None: tuple(param.shape)}).get(shard)
        if full_shape is not None and tuple(tensor.shape) != tuple(full_shape):
            raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, the model config "
                             f"implies {tuple(full_shape)}")
        loader = getattr(param, "weight_loader", None)
        if loader is None:
            default_weight_loader(param, tensor)
        elif shard is None:
            loader(param, tensor)
        else:
            loader(param, tensor, shard)
        loaded.add((target, shard))
    if unexpected:
        raise ValueError(f"checkpoint tensors with no matching parameter: {unexpected[:10]}"
                         + (f" (+{len(unexpected) - 10} more)" if len(unexpected) > 10 else ""))
    missing = sorted(f"{n}" + (f"[{s}]" if s is not None else "") for n, s in expected - loaded)
    if missing:
        raise ValueError(f"checkpoint is missing tensors for: {missing[:10]}"
                         + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))


def dummy_weights(model: nn.Module, seed: int, stacked_params_mapping: list[tuple[str, str, object]]
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """Random tensors named and shaped like the model's checkpoint, each from its own seeded generator.

    Norm weights are ``1 + N(0, 0.05)``; everything else ``N(0, 0.02)``, a scale that keeps activations and
    logits of a deep model in a realistic range.
    """
    by_shard: dict[object, list[tuple[str, str]]] = {}
    for param_part, ckpt_part, shard in stacked_params_mapping:
        by_shard.setdefault(shard, []).append((param_part, ckpt_part))
    for name, param in model.named_parameters():
        shapes = getattr(param, "checkpoint_shapes", None) or {None: tuple(param.shape)}
        for shard, shape in shapes.items():
            ckpt_name = name if shard is None else _checkpoint_name(name, by_shard.get(shard, []))
            gen = torch.Generator(device=param.device)
            gen.manual_seed((seed * 1_000_003 + zlib.crc32(ckpt_name.encode())) % 2**63)
            t = torch.randn(shape, generator=gen, device=param.device, dtype=torch.float32)
            if ckpt_name.endswith("norm.weight"):
                yield ckpt_name, 1.0 + 0.05 * t
            elif param.dtype == torch.float8_e4m3fn:  # FP8 weights span the format; their scales bring them to 0.02
                yield ckpt_name, (100.0 * t).clamp(-448.0, 448.0)
            elif ckpt_name.endswith("weight_scale_inv"):
                yield ckpt_name, torch.full(shape, 0.02 / 100.0, device=param.device)
            else:
                yield ckpt_name, 0.02 * t


def _checkpoint_name(name: str, entries: list[tuple[str, str]]) -> str:
    """The checkpoint name of one shard of parameter ``name`` (the inverse of ``load_named_weights``' mapping)."""
    for param_part, ckpt_part in entries:
        if f".{param_part}." in f"{name}.":
            return f"{name}.".replace(f".{param_part}.", f".{ckpt_part}.", 1)[:-1]
    raise KeyError(f"no checkpoint name for a shard of {name}")


def _shard_ids(param: nn.Parameter) -> list[object]:
    shapes = getattr(param, "checkpoint_shapes", None)
    return list(shapes) if shapes else [None]
