"""The peer model for benchmarks: an HF checkpoint directory, or a preset config (``radixlm.models.presets``)
instantiated by transformers with random weights on the device (same shapes and dtype as radixlm's
``--load-format dummy``; speed does not depend on the values when both sides ignore EOS).

Run as a script it saves such a random checkpoint, so that radixlm and transformers load identical weights:

    python bench/hf_models.py llama-3.1-8b /tmp/llama-3.1-8b-random
"""

from __future__ import annotations

import argparse
import os

import torch
import transformers

from radixlm.models.presets import PRESETS


def load_hf_model(model_path: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    if not os.path.isdir(model_path) and model_path in PRESETS:
        spec = dict(PRESETS[model_path])
        arch = spec.pop("architectures")[0]
        config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**spec, architectures=[arch])
        torch.manual_seed(0)
        with torch.device(device):
            return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    return transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, device_map=device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("out_dir")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    load_hf_model(args.preset, torch.bfloat16, args.device).save_pretrained(args.out_dir)
    print(f"random {args.preset} checkpoint saved in {args.out_dir}")


if __name__ == "__main__":
    main()
