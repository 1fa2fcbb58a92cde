"""Second level of the KV mapping: a free list of KV slots, handed out page by page."""

from __future__ import annotations

import torch

from radixlm.utils.device import to_device_async


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

    def alloc_extend(self, prefix_lens: list[int], seq_lens: list[int],
                     last_locs: torch.Tensor | list[int] | None) -> torch.Tensor | None:
        """Slots for positions ``prefix_len .. seq_len - 1`` of each request, filling its last page first.

        ``last_locs`` ([bs] int64 on the pool's device, or a host list; unused, may be None, with
        ``page_size == 1``) holds the slot of request i's token at ``prefix_len - 1``
        (ignored when the prefix ends on a page boundary).  Position ``q`` of a request lives in slot
        ``page * page_size + q % page_size``, so the rest of a partly filled page continues from ``last_loc``.
        Nothing here reads a device value on the host: the per-token plan is built from the host lengths and
        applied with device gathers.  Returns the concatenation over requests, or None (allocating nothing).
        """
        p = self.page_size
        if p == 1:
            return self.alloc(sum(s - q for q, s in zip(prefix_lens, seq_lens)))
        prefix = torch.tensor(prefix_lens, dtype=torch.int64)
        seq = torch.tensor(seq_lens, dtype=torch.int64)
        first_fresh = (prefix + p - 1) // p * p  # first position that needs a fresh page
        fresh_pages = (seq + p - 1) // p - first_fresh // p
        pages = self._take_pages(int(fresh_pages.sum()))
        if pages is None:
            return None
        req, pos = token_positions(prefix, seq)
        in_last_page = pos < first_fresh[req]
        # Index of each fresh position's slot among the fresh pages' slots, request after request.
        page_base = (fresh_pages.cumsum(0) - fresh_pages) * p
        fresh_index = (page_base[req] + pos - first_fresh[req]).clamp(min=0)
        fresh_slots = self._page_slots(pages)
        if not bool(in_last_page.any()):
            return fresh_slots[to_device_async(fresh_index, self.device)]
        offset = pos - prefix[req] + 1  # slots past last_loc in the partly filled page
        # One pinned upload of the plan: [4, num_new] (request, slot offset, index among fresh slots, in last page)
        plan = to_device_async(torch.stack([req, offset, fresh_index, in_last_page.long()]), self.device)
        fresh = fresh_slots[plan[2]] if fresh_slots.numel() else plan[1]
        assert last_locs is not None, "a partly filled page continues from its last slot"
        if not isinstance(last_locs, torch.Tensor):
            last_locs = to_device_async(last_locs, self.device)
        return torch.where(plan[3].bool(), last_locs[plan[0]] + plan[1], fresh)

    def free(self, slots: torch.Tensor) -> None:
        """Return the pages of ``slots``: the slots of consecutive positions of one sequence, starting on a page
        boundary (whole pages, the last one possibly partly used).  Its pages are every ``page_size``-th slot, so
        no device value is read (a ``unique`` would wait for the GPU)."""
        if slots.numel() == 0:
            return
        pages = slots[:: self.page_size] // self.page_size if self.page_size > 1 else slots.to(torch.int64)
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
        if self.page_size == 1:  # a page is its slot: no kernels in every decode step's allocation
            return pages
        offsets = torch.arange(self.page_size, device=self.device)
        return (pages[:, None] * self.page_size + offsets).reshape(-1)


def token_positions(prefix_lens: torch.Tensor, seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For the new tokens of a batch (positions ``prefix_len .. seq_len - 1`` of each request, request after
    request): the request index and the position of each, as host int64 tensors ``[num_new]``."""
    new = seq_lens - prefix_lens
    req = torch.repeat_interleave(torch.arange(len(new)), new)
    pos = torch.arange(int(new.sum())) - torch.repeat_interleave(new.cumsum(0) - new, new) + prefix_lens[req]
    return req, pos
