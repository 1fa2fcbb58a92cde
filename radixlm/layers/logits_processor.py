"""From final hidden states to the logits the sampler and the logprob code need."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from radixlm.core import ForwardBatch
    from radixlm.layers.embedding import ParallelLMHead


@dataclass
class LogitsOutput:
    next_token_logits: torch.Tensor  # [bs, vocab] float32, at each request's last new token
    # EXTEND with ``extend_logits_start_cpu`` only: logits at every new token of request i from its start index
    # on, requests concatenated: [sum(extend_len_i - start_i), vocab] float32
    input_token_logits: torch.Tensor | None = None


class LogitsProcessor(nn.Module):
    """Projects only the hidden states whose logits are needed (the vocab matmul is the largest one)."""

    def forward(self, hidden: torch.Tensor, lm_head: "ParallelLMHead", fb: "ForwardBatch") -> LogitsOutput:
        if fb.is_decode:
            return LogitsOutput(lm_head.compute_logits(hidden))
        last = fb.extend_start_loc + fb.extend_seq_lens - 1  # [bs]
        if fb.extend_logits_start_cpu is None:
            return LogitsOutput(lm_head.compute_logits(hidden[last]))
        # Rows for the requested input tokens; each request's range ends at its last token, so the
        # next-token logits are a subset of the rows computed once.
        ranges, ends, offset = [], [], 0
        for start, ext, first in zip(fb.extend_start_loc.tolist(), fb.extend_seq_lens_cpu, fb.extend_logits_start_cpu):
            first = min(first, ext - 1)
            ranges.append(torch.arange(start + first, start + ext, device=hidden.device))
            offset += ext - first
            ends.append(offset - 1)
        logits = lm_head.compute_logits(hidden[torch.cat(ranges)])
        return LogitsOutput(logits[ends], logits)
