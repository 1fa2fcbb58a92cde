"""From final hidden states to the logits the sampler and the logprob code need."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from radixlm.core import ForwardMode
from radixlm.utils.device import to_device_async

if TYPE_CHECKING:
    from radixlm.core import ForwardBatch
    from radixlm.layers.embedding import ParallelLMHead


@dataclass
class LogitsOutput:
    # [bs, vocab] float32 at each request's last new token; TARGET_VERIFY: [num_tokens, vocab] at every new token
    next_token_logits: torch.Tensor
    # EXTEND/MIXED with ``extend_logits_start_cpu`` only: logits at every new token of request i from its start
    # index on, requests concatenated: [sum(extend_len_i - start_i), vocab] float32
    input_token_logits: torch.Tensor | None = None
    # With ``return_hidden_states``: the final hidden state at each request's last new token, [bs, hidden]
    hidden_states: torch.Tensor | None = None


class LogitsProcessor(nn.Module):
    """Projects only the hidden states whose logits are needed (the vocab matmul is the largest one)."""

    def forward(self, hidden: torch.Tensor, lm_head: "ParallelLMHead", fb: "ForwardBatch") -> LogitsOutput:
        mode = fb.forward_mode
        # Decode and idle steps have one row (or none) per request; verification scores every draft token.
        ragged = mode in (ForwardMode.EXTEND, ForwardMode.MIXED)
        last = hidden[fb.extend_start_loc + fb.extend_seq_lens - 1] if ragged else hidden  # [bs, hidden]
        kept = last if fb.return_hidden_states and mode is not ForwardMode.TARGET_VERIFY else None
        if not ragged or fb.extend_logits_start_cpu is None:
            return LogitsOutput(lm_head.compute_logits(last), hidden_states=kept)
        # Rows for the requested input tokens; each request's range ends at its last token, so the next-token
        # logits are a subset of the rows computed once.
        ranges, ends, offset = [], [], 0
        starts = [0]
        for ext in fb.extend_seq_lens_cpu[:-1]:
            starts.append(starts[-1] + ext)
        for start, ext, first in zip(starts, fb.extend_seq_lens_cpu, fb.extend_logits_start_cpu):
            first = min(first, ext - 1)
            ranges.append(torch.arange(start + first, start + ext))
            offset += ext - first
            ends.append(offset - 1)
        logits = lm_head.compute_logits(hidden[to_device_async(torch.cat(ranges), hidden.device)])
        return LogitsOutput(logits[to_device_async(ends, hidden.device)], logits, kept)
