"""Comparisons with HF transformers shared by the parity tests: HF's logits and greedy continuations, the
batched extend + decode check of every logit row, and hooks that make HF see FP8 GEMMs' rounded inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


FP8_MAX = 448.0


def round_to_fp8(x: torch.Tensor, group: int) -> torch.Tensor:
    """``x`` [*, K] through E4M3 with one scale per ``group`` channels (max |x| / 448), back in x's dtype."""
    g = x.float().reshape(-1, x.shape[-1] // group, group)
    scale = (g.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(1e-10)
    return ((g / scale).to(torch.float8_e4m3fn).float() * scale).reshape(x.shape).to(x.dtype)


class _RestoreForward:
    def __init__(self, module: torch.nn.Module):
        self.module = module

    def remove(self) -> None:
        del self.module.forward  # the instance attribute: the class's forward is back


def _rounded_experts_forward(experts: torch.nn.Module, group: int):
    """transformers 5's stacked experts (``gate_up_proj`` [E, 2 * inter, hidden], ``down_proj`` [E, hidden, inter])
    computed as HF's eager loop does, with both GEMM inputs rounded through E4M3 per ``group`` channels."""
    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        x = round_to_fp8(hidden_states, group)
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():
            token, pos = torch.where(top_k_index == e)
            gate, up = F.linear(x[token], experts.gate_up_proj[e]).chunk(2, dim=-1)
            act = round_to_fp8(experts.act_fn(gate) * up, group)
            out.index_add_(0, token, F.linear(act, experts.down_proj[e]) * top_k_weights[token, pos, None])
        return out

    return forward


def round_fp8_inputs(hf, group: int | None, expert_group: int | None = None, skip: tuple[str, ...] = ()) -> list:
    """Make ``hf`` see what radixlm's FP8 GEMMs see: the input of every decoder-layer projection (modules named
    ``*proj`` or ``*proj_with_mqa``, except names ending with one of ``skip``) rounded through E4M3 per ``group``
    channels of a token (per token when None), and in every stacked-experts module both GEMM inputs rounded per
    ``expert_group`` channels.  Returns handles to ``remove()``."""
    def hook(module, args):
        return (round_to_fp8(args[0], group or args[0].shape[-1]),)

    handles: list = []
    for n, m in hf.named_modules():
        if ".layers." not in n:
            continue
        if n.endswith(("proj", "proj_with_mqa")) and not n.endswith(skip):
            handles.append(m.register_forward_pre_hook(hook))
        elif expert_group is not None and isinstance(getattr(m, "gate_up_proj", None), torch.nn.Parameter):
            m.forward = _rounded_experts_forward(m, expert_group)
            handles.append(_RestoreForward(m))
    return handles
