"""Host -> device copies that never wait for the GPU."""

from __future__ import annotations

import torch


def to_device_async(values: list[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host list (int64) or CPU tensor on ``device`` without waiting for the work queued there: through pinned
    memory, asynchronously.  A copy from pageable memory would wait for the stream, which undoes the overlap
    schedule (the next step is built while the previous one runs)."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
