"""EXPERIMENT (GPU run P): where a decode step pulls which weight bytes into L2 (``radixlm.kernels.l2_prefetch``).

``RADIXLM_L2_PREFETCH="site:target:MB,..."``: at ``site`` of every decoder layer, when the batch has at most
``SMALL_M`` tokens, prefetch the next ``MB`` megabytes of the layer's ``target`` weight (entries on one target
continue where the earlier ones stopped).  Sites, in kernel order: ``pre_norm`` (before the input norm),
``post_qkv`` (after the qkv GEMV), ``post_attn`` (before the o GEMV), ``pre_mlp`` (before the post-attention
norm), ``post_gate_up`` (before the SiLU-mul).  Targets: ``qkv``, ``o``, ``gate_up``, ``down``.
"""

from __future__ import annotations

import functools
import os

from radixlm.kernels.fp8_activation import SMALL_M
from radixlm.kernels.l2_prefetch import l2_prefetch


@functools.cache
def plan() -> dict[str, list[tuple[str, int, int]]]:
    """site -> [(target, offset bytes, bytes)]."""
    out: dict[str, list[tuple[str, int, int]]] = {}
    offsets: dict[str, int] = {}
    spec = os.environ.get("RADIXLM_L2_PREFETCH", "")
    for entry in filter(None, spec.split(",")):
        site, target, mb = entry.split(":")
        nbytes = int(float(mb) * (1 << 20)) // 16 * 16
        out.setdefault(site, []).append((target, offsets.get(target, 0), nbytes))
        offsets[target] = offsets.get(target, 0) + nbytes
    return out


def prefetch_at(site: str, num_tokens: int, weights) -> None:
    todo = plan().get(site)
    if not todo or num_tokens > SMALL_M or weights is None:
        return
    found = weights()
    for target, offset, nbytes in todo:
        w = found.get(target)
        if w is not None:
            l2_prefetch(w, nbytes, offset)
