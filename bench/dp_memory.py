"""KV tokens a GPU holds under a tensor-parallel layout, with and without data-parallel attention (issue #20's
memory model), from the engine's own parts rather than hand-counted shapes:

- weights: the model built for one rank on the meta device inside ``layout_for_sizing`` (the layers shard
  themselves as in a real TP / DP-attention run; nothing is allocated), its parameters and buffers summed;
- a token's KV bytes: that model's ``kv_cache_spec`` (``--kv-cache-dtype``);
- the pool: ``ModelRunner._init_memory_pools``'s rule,
  ``KV bytes = total x mem_fraction_static - (CUDA context etc.) - weights - CUDA-graph room`` (the graph room
  ``graph_memory_estimate``; under DP attention its feed-forward rows are every DP rank's, padded).

Distinct tokens in the system: with TP alone every rank caches every token (an MLA latent cannot be split by
heads), so the system holds one GPU's worth; with D attention groups each group caches its own requests: D times.

``--check`` (one GPU): the rule against the engine itself at one rank.  Builds ``ModelRunner`` with dummy
weights for the same config cut to ``--check-layers`` layers (as run H3 did), and compares its parameter bytes
with the meta model's (equal, or the meta count is wrong) and its KV pool with this script's prediction, the
CUDA context read from the GPU before the runner is built; whatever else the runner holds at sizing time shows
as the difference.

    python bench/dp_memory.py --model-path deepseek-v3 --fp8-blocks --layouts 8x1 8x2 8x4 8x8
    python bench/dp_memory.py --model-path deepseek-v3 --fp8-blocks --check --check-layers 5     # on a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from types import SimpleNamespace

import torch

from radixlm.config import ServerArgs
from radixlm.distributed import layout_for_sizing
from radixlm.executor.cuda_graph_runner import graph_memory_estimate
from radixlm.executor.model_runner import DEFAULT_GPU_MEM_FRACTION, gpu_kv_budget, graph_batch_limit
from radixlm.mem.kv_spec import FP8_KV_DTYPES
from radixlm.models.loader import resolve_model_config
from radixlm.models.registry import get_model_class

H200_BYTES = 143_771 * 2**20  # what torch.cuda.mem_get_info reports as the lent H200's total (runs I2, H)
FP8_BLOCKS = {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic", "fmt": "e4m3"}


@dataclasses.dataclass
class RankMemory:
    weights: int  # bytes of this rank's parameters and buffers
    kv_bytes_per_token: int
    graph_room: int  # bytes kept free for the CUDA graphs (0: eager)

    def kv_tokens(self, args: ServerArgs, total: int, context: int) -> int:
        """The pool ``ModelRunner`` sizes on a GPU of ``total`` bytes holding ``context`` besides the weights."""
        budget = gpu_kv_budget(total - context - self.weights, total, args, self.graph_room)
        return int(budget // self.kv_bytes_per_token) // args.page_size * args.page_size


def rank_memory(args: ServerArgs, tp_rank: int) -> RankMemory:
    """Rank ``tp_rank``'s weights, KV bytes a token and graph room under ``args``' layout, on the meta device."""
    cfg = resolve_model_config(args)
    dp_size = args.dp_size if args.enable_dp_attention else 1
    with layout_for_sizing(tp_rank, args.tp_size, dp_size), torch.device("meta"):
        model = get_model_class(cfg.architecture)(cfg)
    weights = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
    kv_dtype = FP8_KV_DTYPES.get(args.kv_cache_dtype, cfg.dtype)
    spec = model.kv_cache_spec(kv_dtype)
    max_bs = graph_batch_limit(args, "cuda")
    room = graph_memory_estimate(SimpleNamespace(model_config=cfg, server_args=args, kv_spec=spec, lora=None),
                                 max_bs) if max_bs else 0
    return RankMemory(weights, spec.bytes_per_token(), room)


def layout_table(args: ServerArgs, layouts: list[tuple[int, int]], total: int, context: int) -> None:
    fraction = args.mem_fraction_static or DEFAULT_GPU_MEM_FRACTION
    print(f"{args.model_path}: {total / 1e9:.1f} GB a GPU, mem_fraction_static {fraction}, context {context / 1e9:.2f}"
          f" GB, KV cache {args.kv_cache_dtype}")
    print(f"{'layout':>12s} {'weights GB':>10s} {'KV B/token':>10s} {'graph GB':>8s} {'KV tokens/GPU':>13s} "
          f"{'distinct tokens':>15s}")
    for tp, dp in layouts:
        laid = args.replace(tp_size=tp, dp_size=dp, enable_dp_attention=dp > 1)
        ranks = [rank_memory(laid, r) for r in sorted({0, tp - 1})]  # the engine sizes by the smallest rank
        tokens = min(r.kv_tokens(laid, total, context) for r in ranks)
        worst = max(ranks, key=lambda r: r.weights)
        name = f"TP{tp}" + (f" DP{dp}" if dp > 1 else "")
        print(f"{name:>12s} {worst.weights / 1e9:10.1f} {worst.kv_bytes_per_token:10,d} {worst.graph_room / 1e9:8.2f} "
              f"{tokens:13,d} {tokens * dp:15,d}")


def check(args: ServerArgs, layers: int) -> None:
    """ModelRunner at one rank (tp 1) against the prediction for the same config cut to ``layers`` layers."""
    from radixlm.executor import ModelRunner

    overrides = {**args.model_overrides(), "num_hidden_layers": layers}
    one = args.replace(tp_size=1, dp_size=1, enable_dp_attention=False, device="cuda",
                       json_model_override_args=json.dumps(overrides))
    predicted = rank_memory(one, 0)
    free, total = torch.cuda.mem_get_info()
    context = total - free  # the CUDA context (and anything this process holds) before the runner exists
    runner = ModelRunner(one, resolve_model_config(one))
    real_weights = sum(t.numel() * t.element_size()
                       for t in itertools.chain(runner.model.parameters(), runner.model.buffers()))
    want = predicted.kv_tokens(one, total, context)
    got = runner.memory.max_total_num_tokens
    print(f"check at tp 1, {layers} layers: weights {real_weights:,d} B built, {predicted.weights:,d} B on meta "
          f"({'equal' if real_weights == predicted.weights else 'DIFFERENT'}); context {context / 2**30:.2f} GiB")
    print(f"  KV tokens: engine {got:,d}, predicted {want:,d} ({(got - want) / want:+.3%}; "
          f"{(want - got) * predicted.kv_bytes_per_token / 2**30:+.2f} GiB the engine held besides weights and "
          f"context)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ServerArgs.add_cli_args(parser)
    parser.add_argument("--layouts", nargs="+", default=["8x1", "8x2", "8x4", "8x8"], help="TPxDP")
    parser.add_argument("--fp8-blocks", action="store_true", help="the config with DeepSeek-V3's block-FP8 weights")
    parser.add_argument("--gpu-bytes", type=int, default=H200_BYTES, help="a GPU's total memory")
    parser.add_argument("--context-gb", type=float, default=0.55,
                        help="CUDA context etc. a rank holds (table; 0.51 GiB measured on the H200, run I3)")
    parser.add_argument("--check", action="store_true", help="compare with ModelRunner at tp 1 (needs a GPU)")
    parser.add_argument("--check-layers", type=int, default=5)
    cli = parser.parse_args()
    if cli.load_format == "auto":
        cli.load_format = "dummy"
    if cli.dtype == "auto":
        cli.dtype = "bfloat16"
    args = ServerArgs.from_cli_args(cli)
    if cli.fp8_blocks:
        args = args.replace(json_model_override_args=json.dumps({**args.model_overrides(),
                                                                 "quantization_config": FP8_BLOCKS}))
    layouts = [tuple(int(v) for v in layout.split("x")) for layout in cli.layouts]
    layout_table(args, layouts, cli.gpu_bytes, int(cli.context_gb * 1e9))
    if cli.check:
        check(args, cli.check_layers)


if __name__ == "__main__":
    main()
