"""radixlm against HF transformers on the same weights: logits of batched extend (with cached prefixes) and
decode steps, and greedy continuations token for token."""

from __future__ import annotations

import pytest
import torch

from radixlm.executor.static_batch import generate_static
from radixlm.kernels import cpu as cpu_kernels
from radixlm.sampling import SamplingParams

from conftest import TINY_CONFIGS, build_tiny_hf_model, make_worker
from hf_reference import check_extend_and_decode, hf_greedy

EMBEDDED_LOGIT_TOL = 1e-3  # fp32 on both sides; observed max |diff| is ~1e-5


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
