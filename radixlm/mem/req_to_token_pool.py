"""First level of the KV mapping: (request slot, token position) -> KV slot."""

from __future__ import annotations

import torch


class ReqToTokenPool:
    """An int32 table ``req_to_token[size, max_context_len]`` and a free list of its rows.

    A running request owns one row for its lifetime; row ``r``, column ``p`` holds the KV slot of the request's
    token at position ``p``.  Attention kernels read the table directly, so it lives on the model's device.
    """

    def __init__(self, size: int, max_context_len: int, device: torch.device | str) -> None:
        self.size = size
        self.max_context_len = max_context_len
        self.req_to_token = torch.zeros((size, max_context_len), dtype=torch.int32, device=device)
        self._free: list[int] = list(range(size))

    def available_size(self) -> int:
        return len(self._free)

    def alloc(self, n: int = 1) -> list[int] | None:
        """Take ``n`` rows, or return None (taking nothing) when fewer are free."""
        if n > len(self._free):
            return None
        taken, self._free = self._free[:n], self._free[n:]
        return taken

    def free(self, rows: int | list[int]) -> None:
        rows = [rows] if isinstance(rows, int) else rows
        self._free.extend(rows)

    def write(self, row: int, start: int, kv_slots: torch.Tensor) -> None:
        """Map positions ``start .. start+len(kv_slots)`` of request ``row`` to ``kv_slots``."""
        self.req_to_token[row, start : start + kv_slots.numel()] = kv_slots.to(torch.int32)
