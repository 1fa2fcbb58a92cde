"""Comparisons with HF transformers shared by the parity tests: HF's logits and greedy continuations, and the
batched extend + decode check of every logit row."""

from __future__ import annotations

import torch

from radixlm.executor.static_batch import decode_batch, extend_batch, release


def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:  # [len(ids), vocab]
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


def hf_greedy(hf_model, ids: list[int], n: int, eos: set[int]) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=n, do_sample=False, eos_token_id=sorted(eos) or None,
                                pad_token_id=0)
    return out[0, len(ids):].tolist()


def check_extend_and_decode(worker, hf_model, seqs: list[list[int]], prefix_lens: list[int], tol: float) -> float:
    """Prefill each sequence's prefix, then one batched EXTEND of the rest (requests with and without a cached
    prefix mixed), then three DECODE steps; every logit row is compared with HF's full-sequence forward.
    Returns the max abs difference seen."""
    memory = worker.memory
    rows = memory.req_to_token_pool.alloc(len(seqs))
    cached = [i for i, p in enumerate(prefix_lens) if p > 0]
    worst = 0.0
    try:
        if cached:
            worker.launch(extend_batch(memory, [rows[i] for i in cached], [0] * len(cached),
                                       [seqs[i][: prefix_lens[i]] for i in cached]))
        batch = extend_batch(memory, rows, prefix_lens, [s[p:] for s, p in zip(seqs, prefix_lens)])
        batch.input_logprob_start = [p + 1 for p in prefix_lens]  # logits at every new token
        out = worker.launch(batch).logits
        offset = 0
        for seq, prefix in zip(seqs, prefix_lens):
            n = len(seq) - prefix
            ref = hf_logits(hf_model, seq)[prefix:]
            diff = (out.input_token_logits[offset : offset + n].cpu() - ref).abs().max().item()
            worst = max(worst, diff)
            assert diff < tol, f"extend logits differ by {diff}"
            offset += n
        # Decode: feed fixed tokens (deterministic, independent of either side's sampling).
        seq_lens = [len(s) for s in seqs]
        extended = [list(s) for s in seqs]
        for step in range(3):
            tokens = [(17 * i + 5 * step + 3) % worker.model_config.vocab_size for i in range(len(seqs))]
            logits = worker.launch(decode_batch(memory, rows, seq_lens, tokens)).logits.next_token_logits
            seq_lens = [s + 1 for s in seq_lens]
            for i, t in enumerate(tokens):
                extended[i].append(t)
                diff = (logits[i].cpu() - hf_logits(hf_model, extended[i])[-1]).abs().max().item()
                worst = max(worst, diff)
                assert diff < tol, f"decode step {step} logits differ by {diff}"
    finally:
        release(worker, rows, [len(s) + 3 for s in seqs])
    return worst
