"""radixlm against HF transformers on the same weights: logits of batched extend (with cached prefixes) and
decode steps, and greedy continuations token for token."""

from __future__ import annotations

import pytest
import torch

from radixlm.executor.static_batch import decode_batch, extend_batch, generate_static, release
from radixlm.kernels import cpu as cpu_kernels
from radixlm.sampling import SamplingParams

from conftest import TINY_CONFIGS, build_tiny_hf_model, make_worker

EMBEDDED_LOGIT_TOL = 1e-3  # fp32 on both sides; observed max |diff| is ~1e-5


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
            diff = (out.input_token_logits[offset : offset + n] - ref).abs().max().item()
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
                diff = (logits[i] - hf_logits(hf_model, extended[i])[-1]).abs().max().item()
                worst = max(worst, diff)
                assert diff < tol, f"decode step {step} logits differ by {diff}"
    finally:
        release(worker, rows, [len(s) + 3 for s in seqs])
    return worst


# ------------------------------------------------------------------------------------------ embedded model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "List three primary colors:",
    "Translate to French: Good morning, how are you?",
    "import numpy as np\nx = np.arange(10)\n",
    "The theory of relativity states that",
    "1, 2, 3, 5, 8, 13,",
    "Q: What is the boiling point of water?\nA:",
]


def test_embedded_logits_match_hf(embedded_worker, embedded_hf_model, embedded_tokenizer):
    seqs = [embedded_tokenizer(p).input_ids for p in PROMPTS[:4]]
    prefix_lens = [len(seqs[0]) // 2, 0, len(seqs[2]) - 1, 0]
    check_extend_and_decode(embedded_worker, embedded_hf_model, seqs, prefix_lens, EMBEDDED_LOGIT_TOL)


def test_embedded_greedy_matches_hf(embedded_worker, embedded_hf_model, embedded_tokenizer):
    chat = embedded_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a haiku about the sea."}], add_generation_prompt=True, tokenize=False)
    prompts = [embedded_tokenizer(p).input_ids for p in PROMPTS + [chat]]
    eos = set(embedded_worker.model_config.eos_token_ids)
    ours = generate_static(embedded_worker, prompts, SamplingParams(temperature=0.0, max_new_tokens=64))
    for ids, out in zip(prompts, ours):
        ref = hf_greedy(embedded_hf_model, ids, 64, eos)
        assert out == ref, f"prompt {ids[:8]}...: radixlm {out} != HF {ref}"


# ------------------------------------------------------------------------------------------ tiny models


@pytest.mark.parametrize("backend", ["cpu", "torch_native"])
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_tiny_model_matches_hf(name, backend, tmp_path):
    """Both CPU attention backends: the C kernels (the default) and the torch code they replace."""
    if backend == "cpu" and not cpu_kernels.available():
        pytest.skip("no C compiler: the CPU kernels are not built")
    hf = build_tiny_hf_model(name, str(tmp_path))
    worker = make_worker(str(tmp_path), attention_backend=backend)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (21, 5, 13, 30)]
    check_extend_and_decode(worker, hf, seqs, [9, 0, 12, 20], tol=1e-4)
    outs = generate_static(worker, seqs, SamplingParams(temperature=0.0, max_new_tokens=16, ignore_eos=True))
    for ids, out in zip(seqs, outs):
        assert out == hf_greedy(hf, ids, 16, set())


def test_bf16_checkpoint_served_in_float32_matches_hf(tmp_path):
    from transformers import AutoModelForCausalLM

    build_tiny_hf_model("qwen3", str(tmp_path), dtype=torch.bfloat16)
    # A fresh float32 load of the bf16 checkpoint (casting the bf16 model up would keep bf16-rounded RoPE buffers).
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    worker = make_worker(str(tmp_path), dtype="float32")
    assert worker.runner.model.lm_head.weight.dtype == torch.float32
    seqs = [list(range(3, 40, 3)), [7, 8, 9]]
    check_extend_and_decode(worker, hf, seqs, [4, 0], tol=1e-4)
