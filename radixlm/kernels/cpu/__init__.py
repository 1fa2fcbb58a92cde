"""The engine's CPU kernels: paged decode and extend attention, RMSNorm(+residual), SiLU-and-mul and rotary in C
(``cpu_ops.c``), and linear layers through oneDNN with prepacked weights (``linear``).

They exist because on a CPU the torch code of these ops is bound by what it moves, not by arithmetic: attention
gathers every request's K/V into a padded copy and reads it again, each norm or rotary is a chain of eager ops
(casts included) that each pass over the whole activation, and ``F.linear`` re-packs its weight on every call.
The C kernels read the KV pages in place and make one pass per op.

How they are built: plain C with no torch headers, compiled on first use by the system C compiler (``$CC``, else
``cc``: ``radixlm.utils.toolchain``) with ``-O3 -march=native -fopenmp`` into ``<cache_dir>/kernels/`` (keyed by
the source, the flags and the CPU), then loaded with ctypes.  That takes about a second and needs neither ninja
nor pybind; because torch has already loaded its ``libgomp.so.1``, the library runs on torch's OpenMP threads.
Without a compiler, or with ``RADIXLM_DISABLE_CPU_KERNELS=1``, ``available()`` is False and the layers run their
torch code; so it is when the build fails (the compiler's error is logged).

Each function takes and returns torch CPU tensors, float32 or bfloat16 (``supports``), and follows the rounding
of the torch code in ``radixlm.layers`` (see ``cpu_ops.c``).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from radixlm.kernels import as_rows
from radixlm.utils.cpu_features import cpu_flags
from radixlm.utils.paths import cache_dir
from radixlm.utils.toolchain import DISABLE_ENV, cpu_kernels_disabled, find_c_compiler

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_ops.c")
# -fno-trapping-math / -fno-math-errno change no result; without them gcc will not vectorise the loops that
# convert or divide.  -ffp-contract=off keeps a * b + c two roundings, as in torch.
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno",
          "-std=gnu11", "-shared", "-fPIC"]
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
HEAD_DIM_MULTIPLE = 16  # decode attention holds a head as 16-float vectors

_i64, _ptr, _f32, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "rms_norm": [_ptr, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _f32, _int, _int],
    "silu_and_mul": [_ptr, _i64, _ptr, _i64, _i64, _int, _int],
    "rotary_neox": [_ptr, _i64, _i64, _ptr, _i64, _i64, _ptr, _ptr, _i64, _i64, _ptr, _ptr, _i64, _int, _int],
    "decode_attention": [_ptr, _i64, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _f32, _i64,
                         _int, _int, _int],
    "extend_attention": [_ptr, _i64, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _i64, _i64,
                         _i64, _f32, _i64, _int, _int, _int],
}
EXTEND_QUERY_BLOCK = 32  # cpu_ops.c's EXT_QUERY_BLOCK: new tokens of one request per work item


def _cpu_signature() -> str:
    """What ``-march=native`` compiles for: the machine and its CPU flags."""
    return f"{platform.machine()} {' '.join(cpu_flags()) or platform.processor()}"


def _build(compiler: str) -> Path:
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *_FLAGS, _cpu_signature()]).encode()).hexdigest()[:16]
    target = Path(cache_dir()) / "kernels" / f"cpu_ops-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: tensor-parallel ranks may build at the same time.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", str(built), "-lm"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed to build {_SOURCE.name}:\n{result.stderr}")
        os.replace(built, target)
    return target


@cache
def _library() -> ctypes.CDLL | None:
    if cpu_kernels_disabled():
        return None
    compiler = find_c_compiler()
    if compiler is None:
        logger.warning("no C compiler found: CPU attention and fused ops run as torch code (slower)")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError) as exc:
        # ServerArgs chose the C kernels because a compiler is there; the serving goes on with the torch code,
        # and this message is how the user learns why it is slow.
        logger.error("radixlm's CPU kernels could not be built or loaded with %s, so attention, norms, rotary and "
                     "SiLU run as torch code (slower).  Fix the compiler (or point $CC at a working one), or set "
                     "%s=1 to skip the build.  The error:\n%s", compiler, DISABLE_ENV, exc)
        return None
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    return lib


def available() -> bool:
    """Whether the C kernels are built and loaded (building them on the first call)."""
    return _library() is not None


def supports(*tensors: torch.Tensor) -> bool:
    """True when the kernels can take these tensors: on the CPU, float32 or bfloat16, and the library loaded."""
    return all(t.device.type == "cpu" and t.dtype in _DTYPES for t in tensors) and available()


@cache
def _onednn_linear_dtypes() -> frozenset[torch.dtype]:
    """The dtypes oneDNN runs natively here (bf16 needs the CPU's bf16 instructions); none when disabled."""
    ops = torch.ops.mkldnn
    if (cpu_kernels_disabled() or not torch.backends.mkldnn.is_available()
            or not hasattr(ops, "_reorder_linear_weight") or not hasattr(ops, "_linear_pointwise")):
        return frozenset()
    return frozenset([torch.float32, torch.bfloat16] if ops._is_mkldnn_bf16_supported() else [torch.float32])


def supports_linear(x: torch.Tensor) -> bool:
    """True when ``linear`` can take ``x``: a CPU float32 or bfloat16 tensor (bf16 where oneDNN has it natively)."""
    return x.device.type == "cpu" and x.dtype in _onednn_linear_dtypes()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` through oneDNN with ``weight`` packed once into oneDNN's blocked layout.

    ``F.linear`` re-lays the weight out on every call, which at decode sizes costs as much as the product itself
    (measured here: 2.3x at one row, 15 % at 64 rows in bf16, 2x at 64 rows in float32).  The packed copy is made on
    first use and kept on the weight tensor (``_onednn_packed``), beside the dense weight, which stays the source
    of truth for loading and tying: linear weights take twice their memory on CPU.  Weights must not change after
    their first use (load them before serving).  bf16 results are bit-identical to ``F.linear``; float32 ones
    differ in the last bits (oneDNN's kernel instead of MKL's).
    """
    packed = getattr(weight, "_onednn_packed", None)
    if packed is None:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 64)
        weight._onednn_packed = packed
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _lib() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError("the CPU kernels are not available (see radixlm.kernels.cpu.available())")
    return lib


def _threads() -> int:
    return torch.get_num_threads()


def _rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
              eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    x2d = as_rows(x)
    res2d = as_rows(residual) if residual is not None else None
    out = torch.empty(x.shape, dtype=x.dtype)
    new_residual = torch.empty(x.shape, dtype=x.dtype) if residual is not None else None
    # Copies are bound to names: a temporary's memory would be freed before the C call reads it.
    weight = (weight if weight.dtype == x.dtype else weight.to(x.dtype)).contiguous()
    _lib().rms_norm(
        x2d.data_ptr(), x2d.stride(0), res2d.data_ptr() if res2d is not None else None,
        res2d.stride(0) if res2d is not None else 0, weight.data_ptr(), out.data_ptr(),
        new_residual.data_ptr() if new_residual is not None else None, x2d.shape[0], x2d.shape[1], eps,
        _DTYPES[x.dtype], _threads(),
    )
    return out, new_residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (h * rsqrt(mean(h^2) + eps)).to(x.dtype)`` over the last dim, ``h = x.float()``."""
    return _rms_norm(x, None, weight, eps)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)`` in one pass; neither input is modified."""
    out, new_residual = _rms_norm(x, residual, weight, eps)
    assert new_residual is not None
    return out, new_residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``x`` [..., 2 * d] = gate ‖ up; a new contiguous [..., d] in x's dtype."""
    x2d = as_rows(x)
    d = x2d.shape[1] // 2
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype)
    _lib().silu_and_mul(x2d.data_ptr(), x2d.stride(0), out.data_ptr(), x2d.shape[0], d, _DTYPES[x.dtype], _threads())
    return out


def _token_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` [tokens, heads, head_dim] with contiguous heads (any token stride), copying only if needed."""
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                 rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX rotary of ``q`` [tokens, num_heads, head_dim] and ``k`` [tokens, num_kv_heads, head_dim] at
    ``positions`` [tokens]; ``cos_sin_cache`` [max_position, rotary_dim] float32.  New contiguous outputs."""
    q, k = _token_rows(q), _token_rows(k)
    # Copies are bound to names: a temporary's memory would be freed before the C call reads it.
    positions = positions.to(torch.int64).contiguous()
    cos_sin_cache = cos_sin_cache.float().contiguous()
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype), torch.empty(k.shape, dtype=k.dtype)
    _lib().rotary_neox(
        q.data_ptr(), q.stride(0), q.shape[1], k.data_ptr(), k.stride(0), k.shape[1], positions.data_ptr(),
        cos_sin_cache.data_ptr(), rotary_dim, q.shape[2], q_out.data_ptr(), k_out.data_ptr(), q.shape[0],
        _DTYPES[q.dtype], _threads(),
    )
    return q_out, k_out


def _int64(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.int64).contiguous()


def _check_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, req_to_token: torch.Tensor) -> int:
    """What the attention kernels require of their operands; returns the number of KV heads."""
    num_heads, head_dim, num_kv_heads = q.shape[1], q.shape[2], k_buf.shape[1]
    if (num_heads % num_kv_heads or head_dim % HEAD_DIM_MULTIPLE or k_buf.dtype != v_buf.dtype
            or k_buf.dtype not in _DTYPES or req_to_token.dtype != torch.int32
            or not (k_buf.is_contiguous() and v_buf.is_contiguous() and req_to_token.stride(1) == 1)):
        raise ValueError(f"CPU attention: heads must group evenly over KV heads, head_dim be a multiple of "
                         f"{HEAD_DIM_MULTIPLE}, K/V contiguous float32 or bfloat16 of one dtype, req_to_token int32 "
                         "with contiguous rows")
    return num_kv_heads


def decode_attention(
    q: torch.Tensor,  # [bs, num_heads, head_dim]
    k_buf: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    v_buf: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    req_to_token: torch.Tensor,  # [rows, max_context] int32
    req_rows: torch.Tensor,  # [bs] int64
    seq_lens: torch.Tensor,  # [bs] int64
    scaling: float,
    sliding_window: int | None = None,
) -> torch.Tensor:  # [bs, num_heads, head_dim] in q's dtype
    """Each request's one new query attends to positions ``0 .. seq_len - 1`` of its row of ``req_to_token``
    (the last ``sliding_window`` of them, if set), reading K/V pages in place.  K/V must be float32 or bfloat16;
    a query of another dtype is computed in float32."""
    if q.dtype not in _DTYPES:
        return decode_attention(q.float(), k_buf, v_buf, req_to_token, req_rows, seq_lens, scaling,
                                sliding_window).to(q.dtype)
    q = _token_rows(q)
    req_rows, seq_lens = _int64(req_rows), _int64(seq_lens)
    bs, num_heads, head_dim = q.shape
    num_kv_heads = _check_attention(q, k_buf, v_buf, req_to_token)
    out = torch.empty(q.shape, dtype=q.dtype)
    _lib().decode_attention(
        q.data_ptr(), q.stride(0), k_buf.data_ptr(), v_buf.data_ptr(), req_to_token.data_ptr(),
        req_to_token.stride(0), req_rows.data_ptr(), seq_lens.data_ptr(), out.data_ptr(), bs, num_heads,
        num_kv_heads, head_dim, scaling, sliding_window or 0, _DTYPES[q.dtype], _DTYPES[k_buf.dtype], _threads(),
    )
    return out


@dataclass(frozen=True)
class ExtendPlan:
    """The index arrays of ``extend_attention`` for one batch, built once and shared by every layer."""

    req_rows: torch.Tensor  # [num_reqs] int64, row of each request in req_to_token
    prefix_lens: torch.Tensor  # [num_reqs] int64, cached positions of each request
    extend_lens: torch.Tensor  # [num_reqs] int64, new positions of each request
    q_starts: torch.Tensor  # [num_reqs] int64, row of each request's first new token in q
    block_starts: torch.Tensor  # [num_reqs + 1] int64, first work block of each request (then the total)
    num_tokens: int

    @staticmethod
    def build(req_rows: torch.Tensor, prefix_lens: list[int], extend_lens: list[int]) -> "ExtendPlan":
        starts, blocks = [0], [0]
        for n in extend_lens:
            starts.append(starts[-1] + n)
            blocks.append(blocks[-1] + -(-n // EXTEND_QUERY_BLOCK))
        meta = torch.tensor([prefix_lens, extend_lens, starts[:-1]], dtype=torch.int64)
        return ExtendPlan(_int64(req_rows), meta[0], meta[1], meta[2], torch.tensor(blocks, dtype=torch.int64),
                          starts[-1])


def extend_attention(
    q: torch.Tensor,  # [num_new_tokens, num_heads, head_dim], requests' new tokens one after another
    k_buf: torch.Tensor,  # [num_slots, num_kv_heads, head_dim], the new tokens' K/V already stored
    v_buf: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    req_to_token: torch.Tensor,  # [rows, max_context] int32
    plan: ExtendPlan,
    scaling: float,
    sliding_window: int | None = None,
) -> torch.Tensor:  # [num_new_tokens, num_heads, head_dim] in q's dtype
    """New token i of a request (position prefix + i) attends to the request's positions 0 .. prefix + i (the
    last ``sliding_window`` of them, if set), reading K/V pages in place.  A query of a dtype other than float32
    or bfloat16 is computed in float32."""
    if q.dtype not in _DTYPES:
        return extend_attention(q.float(), k_buf, v_buf, req_to_token, plan, scaling, sliding_window).to(q.dtype)
    q = _token_rows(q)
    num_kv_heads = _check_attention(q, k_buf, v_buf, req_to_token)
    if plan.num_tokens != q.shape[0]:
        raise ValueError(f"extend_attention: {q.shape[0]} query tokens for {plan.num_tokens} new positions")
    out = torch.empty(q.shape, dtype=q.dtype)
    _lib().extend_attention(
        q.data_ptr(), q.stride(0), k_buf.data_ptr(), v_buf.data_ptr(), req_to_token.data_ptr(), req_to_token.stride(0),
        plan.req_rows.data_ptr(), plan.prefix_lens.data_ptr(), plan.extend_lens.data_ptr(), plan.q_starts.data_ptr(),
        plan.block_starts.data_ptr(), len(plan.req_rows), out.data_ptr(), q.shape[1], num_kv_heads, q.shape[2],
        scaling, sliding_window or 0, _DTYPES[q.dtype], _DTYPES[k_buf.dtype], _threads(),
    )
    return out
