"""The peer for multi-LoRA decode: HF transformers + peft ``generate`` on a batch whose rows run different
adapters (peft's ``adapter_names``: each LoRA layer loops over the adapters of the batch), against the same model
with the adapters disabled.  Greedy, dynamic KV cache, random prompts; ms/token of the whole generate (prefill included,
a few percent of it at these lengths).

The adapters are bench/lora_bench.py's random PEFT directories (``write_random_adapter``: every projection, one
per rank), loaded under several names, so the numbers line up with its table:

    python bench/hf_lora_peer.py --model-path llama-3.1-8b --rank 16 --batch-size 1 32 --num-adapters 1 4 \
        --input-len 256 --output-len 32
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from hf_models import load_hf_model
from lora_bench import write_random_adapter

from radixlm.config import ServerArgs
from radixlm.models.loader import resolve_model_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True, help="HF checkpoint directory or a preset name")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--num-adapters", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--device", default="cuda", help="cpu: a check of the script on a tiny model")
    parser.add_argument("--adapter-dir", default=os.path.join(tempfile.gettempdir(), "radixlm-bench-adapters"))
    args = parser.parse_args()
    import peft

    cfg = resolve_model_config(ServerArgs(model_path=args.model_path, load_format="dummy", device="cpu"))
    path = write_random_adapter(os.path.join(args.adapter_dir, f"{cfg.architecture}-r{args.rank}"), cfg, args.rank,
                                seed=args.rank)
    dev = args.device
    model = load_hf_model(args.model_path, torch.bfloat16 if dev == "cuda" else torch.float32, dev)
    names = [f"a{i}" for i in range(max(args.num_adapters))]
    model = peft.PeftModel.from_pretrained(model, path, adapter_name=names[0]).eval()
    for name in names[1:]:
        model.load_adapter(path, adapter_name=name)
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def sync() -> None:
        if dev == "cuda":
            torch.cuda.synchronize()

    def run(bs: int, adapters: int) -> float:
        ids = torch.randint(0, cfg.vocab_size, (bs, args.input_len), device=dev,
                            generator=torch.Generator(dev).manual_seed(bs))
        extra = {"adapter_names": [names[i % adapters] for i in range(bs)]} if adapters else {}
        n = args.output_len
        for timed in (False, True):  # warm-up at the timed shapes, then the timed run
            sync()
            start = time.perf_counter()
            if adapters:
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                     min_new_tokens=n, **extra, **kwargs)
            else:
                with model.disable_adapter():
                    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                         min_new_tokens=n, **kwargs)
            sync()
            assert out.shape[1] == args.input_len + n
        return (time.perf_counter() - start) / n

    dtype = next(model.parameters()).dtype
    print(f"HF transformers + peft {peft.__version__}, {args.model_path} {dtype}, rank {args.rank}, input "
          f"{args.input_len}, output {args.output_len}, dynamic cache")
    print(f"{'configuration':<28} {'batch':>6} {'ms/token':>9} {'tok/s':>9} {'overhead':>9}")
    for bs in args.batch_size:
        base = run(bs, 0)
        print(f"{'adapters disabled':<28} {bs:>6} {base * 1e3:>9.2f} {bs / base:>9.1f} {'':>9}", flush=True)
        for n in args.num_adapters:
            t = run(bs, n)
            label = f"rank {args.rank}, {n} adapter{'s' * (n > 1)}"
            print(f"{label:<28} {bs:>6} {t * 1e3:>9.2f} {bs / t:>9.1f} {(t / base - 1) * 100:>+8.1f}%", flush=True)


if __name__ == "__main__":
    main()
