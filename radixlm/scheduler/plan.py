"""A planned step: the requests of one model step in row order, and the ``Batch`` that describes it to the
executor.  Planning assigns the step's KV slots; it never reads a device value, so a step can be planned while
the previous one still runs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radixlm.core import Batch, ForwardMode, Req, SamplingRows
from radixlm.mem import KVMemory, assign_kv_slots


@dataclass
class PlannedStep:
    """``reqs[:num_prefill]`` compute prompt chunks (their ``extend_len`` tokens), the rest decode one token."""

    reqs: list[Req]
    num_prefill: int
    batch: Batch


def plan_step(mode: ForwardMode, prefill: list[Req], decode: list[Req], memory: KVMemory, epoch: int,
              prev_rows: list[Req] | None = None) -> PlannedStep:
    """Describe one step over ``prefill`` rows (``extend_len`` new tokens each, after their ``kv_len``) and
    ``decode`` rows (one token each), assign the KV slots of the new tokens and count them in ``kv_len``.

    ``prev_rows``: the rows of the step still in flight (overlap schedule); a decode row's input is then that
    step's sample for it, named by placeholder, because the host does not have it yet.  The caller has made room
    in the KV pool (eviction, retraction, admission budget); running out here is a scheduler bug.
    """
    reqs = prefill + decode
    extend_lens = [r.extend_len for r in prefill] + [1] * len(decode)
    prefix_lens = [r.kv_len for r in reqs]
    input_ids = [t for r in prefill for t in r.all_ids()[r.kv_len : r.kv_len + r.extend_len]]
    if prev_rows is None:
        input_ids += [r.output_ids[-1] for r in decode]
    else:
        row_of = {id(r): j for j, r in enumerate(prev_rows)}
        input_ids += [-(row_of[id(r)] + 1) for r in decode]
    rows = [r.req_pool_idx for r in reqs]
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    slots = assign_kv_slots(memory.req_to_token_pool, memory.allocator, rows, prefix_lens, seq_lens)
    if slots is None:
        raise RuntimeError(f"scheduler bug: {sum(extend_lens)} new tokens planned without room in the KV pool "
                           f"({memory.allocator.available_size()} slots free)")
    batch = Batch(mode, rows, prefix_lens, extend_lens, input_ids, slots,
                  SamplingRows([r.sampling_params for r in reqs], [r.seed for r in reqs],
                               [r.origin_input_ids for r in reqs], [r.output_ids for r in reqs], epoch))
    if any(r.logprobs is not None for r in reqs):
        batch.logprobs = [None if r.logprobs is None else r.logprobs.options for r in reqs]
        batch.input_logprob_start = [_input_logprob_start(r) for r in prefill] + [None] * len(decode)
    if any(r.lora_name is not None for r in reqs):
        batch.lora_names = [r.lora_name for r in reqs]
    batch.return_hidden_states = any(r.return_hidden_states for r in reqs)
    batch.input_embeds = _input_embeds(prefill) or None
    if any(r.mrope_positions is not None for r in reqs):
        batch.mrope_positions = torch.cat([_mrope(r, p, p + e) for r, p, e in zip(reqs, prefix_lens, extend_lens)],
                                          dim=1)
    for req, ext in zip(reqs, extend_lens):
        req.kv_len += ext  # the KV of a launched step counts from now on
    return PlannedStep(reqs, len(prefill), batch)


def _input_logprob_start(req: Req) -> int | None:
    """First prompt position whose logprob the request still wants, or None."""
    lp = req.logprobs
    if lp is None or lp.input_done:
        return None
    return lp.options.input_start(len(req.origin_input_ids))


def _input_embeds(prefill: list[Req]) -> list[tuple[int, torch.Tensor]]:
    out, offset = [], 0
    for req in prefill:
        out += [(offset + i, e) for i, e in req.embeds_in(req.kv_len, req.kv_len + req.extend_len)]
        offset += req.extend_len
    return out


def _mrope(req: Req, start: int, end: int) -> torch.Tensor:
    positions = req.positions_of(start, end)
    return torch.arange(start, end).expand(3, -1) if positions is None else positions
