"""Second level of the KV mapping: a free list of KV slots, handed out page by page."""

from __future__ import annotations

import torch


class TokenToKVPoolAllocator:
    """Hands out KV-cache slots in ``[page_size, size + page_size)``; the first page is never handed out.

    Slot 0 (the whole first page) is the dummy target that padded tokens write their KV to, so a padded batch
    needs no special casing in the kernels.  Slots are allocated and freed in whole pages: page ``p`` owns slots
    ``p * page_size .. (p + 1) * page_size - 1``.  With ``page_size == 1`` every slot is its own page.

    ``alloc`` and ``free`` are O(1) per slot: the free list is a tensor that allocation slices from the front,
    and frees are appended (batched between ``free_group_begin``/``free_group_end`` into one concatenation).
    """

    def __init__(self, size: int, page_size: int = 1, device: torch.device | str = "cpu") -> None:
        if size % page_size:
            raise ValueError(f"KV pool size {size} is not a multiple of the page size {page_size}")
        self.size = size
        self.page_size = page_size
        self.num_pages = size // page_size
        self.device = torch.device(device)
        self._pending_free: list[torch.Tensor] = []
        self._grouping = False
        self.clear()

    def clear(self) -> None:
        # Pages 1..num_pages; page 0 is the padding page.
        self._free_pages = torch.arange(1, self.num_pages + 1, dtype=torch.int64, device=self.device)
        self._pending_free = []

    def available_size(self) -> int:
        """Free slots (in tokens)."""
        return (self._free_pages.numel() + sum(t.numel() for t in self._pending_free)) * self.page_size

    def _take_pages(self, num_pages: int) -> torch.Tensor | None:
        if num_pages > self._free_pages.numel() and self._pending_free:
            self._merge_pending()
        if num_pages > self._free_pages.numel():
            return None
        pages, self._free_pages = self._free_pages[:num_pages], self._free_pages[num_pages:]
        return pages

    def alloc(self, need_size: int) -> torch.Tensor | None:
        """Allocate ``need_size`` slots in fresh pages, or None (allocating nothing) if memory is short.

        With ``page_size > 1`` the tail of the last page is allocated too but not returned; extend and decode of
        requests that already own a partially filled page go through ``alloc_extend`` instead.
        """
        num_pages = -(-need_size // self.page_size)
        pages = self._take_pages(num_pages)
        if pages is None:
            return None
        return self._page_slots(pages)[:need_size]

    def alloc_extend(self, prefix_lens: list[int], seq_lens: list[int], last_locs: list[int]) -> torch.Tensor | None:
        """Slots for positions ``prefix_len .. seq_len - 1`` of each request, filling its last page first.

        ``last_locs[i]`` is the slot of request i's token at ``prefix_len - 1`` (ignored when the prefix ends on
        a page boundary).  Returns the concatenation over requests, or None (allocating nothing) if short.
        """
        p = self.page_size
        if p == 1:
            return self.alloc(sum(s - q for q, s in zip(prefix_lens, seq_lens)))
        new_pages = sum(-(-s // p) - -(-q // p) for q, s in zip(prefix_lens, seq_lens))
        pages = self._take_pages(new_pages)
        if pages is None:
            return None
        out, cursor = [], 0
        for prefix, seq, last in zip(prefix_lens, seq_lens, last_locs):
            in_last_page = min(seq, -(-prefix // p) * p) - prefix  # positions that fit the current last page
            if in_last_page > 0:
                out.append(torch.arange(last + 1, last + 1 + in_last_page, device=self.device))
            fresh = -(-seq // p) - -(-prefix // p)
            if fresh:
                slots = self._page_slots(pages[cursor : cursor + fresh])
                out.append(slots[: seq - prefix - max(in_last_page, 0)])
                cursor += fresh
        if not out:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        return torch.cat(out)

    def free(self, slots: torch.Tensor) -> None:
        """Return the pages of ``slots`` (every slot of a page must be freed together)."""
        if slots.numel() == 0:
            return
        pages = torch.unique(slots // self.page_size) if self.page_size > 1 else slots.to(torch.int64)
        self._pending_free.append(pages)
        if not self._grouping:
            self._merge_pending()

    def free_group_begin(self) -> None:
        self._grouping = True

    def free_group_end(self) -> None:
        self._grouping = False
        self._merge_pending()

    def _merge_pending(self) -> None:
        if self._pending_free:
            self._free_pages = torch.cat([self._free_pages, *self._pending_free])
            self._pending_free = []

    def _page_slots(self, pages: torch.Tensor) -> torch.Tensor:
        offsets = torch.arange(self.page_size, device=self.device)
        return (pages[:, None] * self.page_size + offsets).reshape(-1)
