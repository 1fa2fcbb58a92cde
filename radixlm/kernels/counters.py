"""Arrival counters for kernels whose last program to arrive finishes a group's work (a split-K reduction, an
epilogue over several programs' partials, the split-KV attention's merge).

Each program adds one to its group's int32 counter with acquire-release semantics after writing its partial;
the one that sees ``arrivals - 1`` reads the others' partials and resets the counter to zero.  So a launch needs
no memset and no second kernel, and CUDA graphs replay it as is, provided the buffer starts zeroed: one per
(kernel family, device, stream), made zeroed on first use.  Launches on one stream run one after another (a
PDL launch touches counters only after its wait), so a family's launches share its buffer.
"""

from __future__ import annotations

import torch

COUNTERS = 1 << 16  # groups one launch may count
_buffers: dict[tuple[str, torch.device, int], torch.Tensor] = {}


def arrival_counters(owner: str, device: torch.device | str) -> torch.Tensor:
    """``owner``'s zeroed int32 counters [COUNTERS] on ``device``'s current stream."""
    device = torch.device(device)
    key = (owner, device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    buf = _buffers.get(key)
    if buf is None:
        buf = _buffers[key] = torch.zeros(COUNTERS, dtype=torch.int32, device=device)
    return buf
