"""The mixture-of-experts models served end to end: ``radixlm serve`` (OpenAI chat API and native /generate) on a
tiny DeepSeek-V3 and the in-process ``Engine`` on a tiny Qwen3-MoE, both with dummy weights and the embedded
model's tokenizer; every answer equals the static-batch greedy tokens of the same weights (whose parity with HF
is in tests/parity/test_moe_models.py)."""

from __future__ import annotations


import torch
import transformers

import radixlm
from radixlm.executor.static_batch import generate_static
from radixlm.sampling import SamplingParams

from conftest import MOE_CONFIGS, copy_embedded_tokenizer, make_worker
from server_harness import LiveServer



def tiny_moe_dir(name: str, directory: str) -> str:
    """``MOE_CONFIGS[name]`` with the embedded model's vocabulary and tokenizer files (weights: --load-format
    dummy)."""
    spec = dict(MOE_CONFIGS[name], vocab_size=49152)
    arch = spec.pop("arch")
    config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**spec, architectures=[arch])
    config.save_pretrained(directory)
    return copy_embedded_tokenizer(directory)


def static_greedy(path: str, ids: list[int], n: int) -> list[int]:
    worker = make_worker(path, load_format="dummy", dtype="float32")
    return generate_static(worker, [ids], SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True))[0]


def test_serve_deepseek_v3(tmp_path):
    path = tiny_moe_dir("deepseek_v3", str(tmp_path))
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    server = LiveServer("--model-path", path, "--load-format", "dummy", "--max-total-tokens", "4096")
    try:
        import openai

        client = openai.OpenAI(base_url=server.base + "/v1", api_key="none")
        messages = [{"role": "user", "content": "Name three rivers."}]
        chat = client.chat.completions.create(model="any", messages=messages, max_tokens=8, temperature=0,
                                              extra_body={"ignore_eos": True})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        want = static_greedy(path, list(prompt), 8)
        assert chat.usage.completion_tokens == 8
        assert chat.choices[0].message.content == tokenizer.decode(want, skip_special_tokens=True)
        status, body = server.request("POST", "/generate", {"input_ids": list(prompt), "sampling_params": {
            "max_new_tokens": 8, "temperature": 0, "ignore_eos": True}})
        assert status == 200 and body["output_ids"] == want
    finally:
        server.stop()


def test_engine_qwen3_moe(tmp_path):
    path = tiny_moe_dir("qwen3_moe", str(tmp_path))
    ids = list(range(100, 140))
    want = static_greedy(path, ids, 6)
    with radixlm.Engine(model_path=path, load_format="dummy", dtype="float32", max_total_tokens=2048,
                        random_seed=0, chunked_prefill_size=16) as engine:
        outs = engine.generate(input_ids=[ids, ids[:20]], sampling_params={"max_new_tokens": 6, "temperature": 0,
                                                                          "ignore_eos": True})
        assert outs[0]["output_ids"] == want
        assert outs[1]["output_ids"] == static_greedy(path, ids[:20], 6)
        assert torch.tensor(outs[0]["output_ids"]).numel() == 6
