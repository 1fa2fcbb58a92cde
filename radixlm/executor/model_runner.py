"""``ModelRunner``: owns the model, the KV memory and the attention backend of one TP rank, and runs steps."""

from __future__ import annotations

import logging

import torch

from radixlm.attention import create_attention_backend
from radixlm.config import ModelConfig, ServerArgs
from radixlm.config.model_config import resolve_dtype
from radixlm.core import ForwardBatch
from radixlm.distributed import get_dp_attention, init_tensor_parallel
from radixlm.executor.cuda_graph_runner import CudaGraphRunner, graph_memory_estimate
from radixlm.kernels.argmax import row_argmax
from radixlm.layers.logits_processor import LogitsOutput
from radixlm.lora.manager import LoRAManager, resolve_max_lora_rank
from radixlm.mem import KVMemory, create_kv_pool
from radixlm.mem.kv_spec import FP8_KV_DTYPES
from radixlm.models.loader import load_model
from radixlm.sampling import Sampler

logger = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 1 << 30  # default KV budget on CPU when --max-total-tokens is not given
DEFAULT_GPU_MEM_FRACTION = 0.88
DEFAULT_CUDA_GRAPH_MAX_BS = 256


def graph_batch_limit(args: ServerArgs, device_type: str) -> int:
    """Largest decode batch captured in a CUDA graph; 0 when decode runs eagerly."""
    if device_type != "cuda" or args.disable_cuda_graph or args.attention_backend == "torch_native":
        return 0  # torch-native attention sizes its decode tensors from host values: not capturable
    return min(args.cuda_graph_max_bs or DEFAULT_CUDA_GRAPH_MAX_BS, args.max_running_requests or 1 << 30)


def gpu_kv_budget(free: int, total: int, args: ServerArgs, graph_room: int) -> float:
    """Bytes for the KV pool on a GPU with ``free`` of ``total`` bytes free once the model is loaded: everything
    already allocated (weights, the CUDA context) counts against ``--mem-fraction-static``, and ``graph_room``
    (the CUDA graphs' activations, captured later) stays free."""
    fraction = args.mem_fraction_static or DEFAULT_GPU_MEM_FRACTION
    return free - total * (1.0 - fraction) - graph_room


class ModelRunner:
    """One tensor-parallel rank's model, its KV pool (in the layout of the model's ``kv_spec``) with the
    ``memory`` bookkeeping sized from it, the attention backend and the CUDA graphs.  ``forward`` runs a
    ``ForwardBatch``; ``ModelWorker`` turns the scheduler's ``Batch``es into them."""

    def __init__(self, server_args: ServerArgs, model_config: ModelConfig, tp_rank: int = 0):
        self.server_args = server_args
        self.model_config = model_config
        self.tp_rank = tp_rank
        gpu_id = server_args.base_gpu_id + tp_rank % server_args.tp_size_per_node  # each node counts from 0
        self.device = torch.device(f"cuda:{gpu_id}" if server_args.device == "cuda" else "cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        init_method = f"tcp://{server_args.dist_init_addr}" if server_args.dist_init_addr else "env://"
        self.tp = init_tensor_parallel(tp_rank, server_args.tp_size, self.device, init_method, server_args.dp_size,
                                       server_args.dist_timeout)
        self.dp = get_dp_attention()
        torch.manual_seed(server_args.random_seed)

        self.model = load_model(model_config, server_args.load_format, self.device, server_args.random_seed)
        self.lora = self._init_lora()  # before the KV pool is sized: the adapter pool's memory counts
        self.kv_spec = self.model.kv_cache_spec(self._kv_cache_dtype())
        self.cuda_graph_max_bs = self._graph_batch_limit()
        self._init_memory_pools()
        self.attn_backend = create_attention_backend(
            server_args.attention_backend, num_heads=model_config.num_attention_heads // self.dp.attn_tp.size,
            kv_spec=self.kv_spec, max_batch_size=self.memory.max_running_requests, device=self.device,
            max_context_len=model_config.context_length,
        )
        self.sampler = Sampler(row_argmax)
        self.cuda_graph_runner: CudaGraphRunner | None = None
        if self.cuda_graph_max_bs:
            self.cuda_graph_runner = CudaGraphRunner(self, min(self.cuda_graph_max_bs,
                                                               self.memory.max_running_requests))
        if self.device.type == "cpu":
            self._warm_up()

    def _warm_up(self) -> None:
        """One tiny extend and decode, so that the first request does not pay for what is built on first use
        (oneDNN's packed weights and primitives, the C kernels' library).  Every rank runs it (it holds
        collectives); it takes and returns one request row and a few KV slots."""
        from radixlm.executor.static_batch import generate_static  # it imports this module
        from radixlm.executor.worker import ModelWorker
        from radixlm.sampling import SamplingParams

        generate_static(ModelWorker(self), [[0, 1, 2, 3]],
                        SamplingParams(temperature=0.0, max_new_tokens=2, ignore_eos=True))

    def _init_lora(self) -> LoRAManager | None:
        """With ``--enable-lora``, the adapter pool on the model's layers and the ``--lora-paths`` adapters
        (a bad one fails startup with its LoRAAdapterError)."""
        args = self.server_args
        if not args.enable_lora:
            return None
        lora = LoRAManager(self.model, self.model_config, args, self.tp.rank, self.tp.size, self.device,
                           resolve_max_lora_rank(args))
        for name, path in args.lora_path_map().items():
            lora.load_adapter(name, path)
        logger.info("LoRA: %d slots of rank %d (%.1f MiB), %d adapters loaded", lora.num_slots, lora.max_rank,
                    lora.pool.bytes() / 2**20, len(lora.adapters))
        return lora

    # ---------------------------------------------------------------- memory
    def _graph_batch_limit(self) -> int:
        return graph_batch_limit(self.server_args, self.device.type)

    def _init_memory_pools(self) -> None:
        args, cfg = self.server_args, self.model_config
        context_len = cfg.context_length
        cell = self.kv_spec.bytes_per_token()
        if self.device.type == "cuda":
            # Blocks the loading freed (a dummy load's generators, online FP8's unquantized weights) are still
            # the caching allocator's and count as used: give them back before measuring, or the pool loses them.
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(self.device)
            # The graphs' activations are captured after the KV pool exists; keep their room free now.
            graph_room = graph_memory_estimate(self, self.cuda_graph_max_bs) if self.cuda_graph_max_bs else 0
            budget = gpu_kv_budget(free, total, args, graph_room)
        else:
            budget = CPU_KV_CACHE_BYTES
        max_tokens = int(budget // cell)
        if args.max_total_tokens is not None:
            max_tokens = min(max_tokens, args.max_total_tokens) if self.device.type == "cuda" else args.max_total_tokens
        max_tokens = self._min_over_ranks(max_tokens) // args.page_size * args.page_size
        if max_tokens < args.page_size * 2:
            raise RuntimeError(f"not enough memory for the KV cache ({max_tokens} tokens); lower the model size, "
                               "raise --mem-fraction-static or set --max-total-tokens")
        max_reqs = args.max_running_requests or min(max(max_tokens * 512 // context_len, 256), 4096)
        self.memory = KVMemory.create(max_tokens, args.page_size, max_reqs, context_len, self.device)
        self.kv_pool = create_kv_pool(self.kv_spec, max_tokens, args.page_size, self.device)
        self._apply_checkpoint_kv_scales()
        logger.info("KV cache (%s, %s): %d tokens (%.2f GiB), %d request slots", self.kv_spec.layout,
                    str(self.kv_spec.dtype).removeprefix("torch."), max_tokens, self.kv_pool.bytes() / 2**30, max_reqs)

    def _apply_checkpoint_kv_scales(self) -> None:
        """An FP8 pool takes the checkpoint's per-layer K/V scales (``model.kv_scales``; 1.0 where it has none),
        before anything is stored; any other cache ignores them."""
        scales = self.model.kv_scales
        if not scales:
            return
        if self.kv_spec.quantized:
            scales.apply(self.kv_pool)
            logger.info("FP8 KV cache: the checkpoint's scales for %d of %d layers", len(scales.by_layer),
                        self.kv_spec.num_layers)
        else:
            logger.info("the checkpoint's FP8 KV-cache scales are not used: --kv-cache-dtype is %s",
                        self.server_args.kv_cache_dtype)

    def _kv_cache_dtype(self) -> torch.dtype:
        """``--kv-cache-dtype``; ``auto`` is float32 where attention computes in float32 from the cache anyway (the
        torch-native backend on CPU: no per-step cast of the whole context), else the model dtype.  ``fp8_e4m3`` /
        ``fp8_e5m2`` store FP8 with the checkpoint's per-layer scales (``_apply_checkpoint_kv_scales``), 1.0
        without them."""
        name = self.server_args.kv_cache_dtype
        if name in FP8_KV_DTYPES:
            return FP8_KV_DTYPES[name]
        if name != "auto":
            return resolve_dtype(name, {}, self.device.type)
        if self.device.type == "cpu" and self.server_args.attention_backend == "torch_native":
            return torch.float32
        return self.model_config.dtype

    def _min_over_ranks(self, value: int) -> int:
        if self.tp.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=self.tp.group)
        return int(t.item())

    # ---------------------------------------------------------------- execution
    @torch.inference_mode()
    def forward(self, forward_batch: ForwardBatch) -> LogitsOutput:
        if self.cuda_graph_runner is not None and self.cuda_graph_runner.can_run(forward_batch):
            return self.cuda_graph_runner.replay(forward_batch)
        return self.forward_eager(forward_batch)

    @torch.inference_mode()
    def forward_eager(self, forward_batch: ForwardBatch) -> LogitsOutput:
        self.attn_backend.init_forward_metadata(forward_batch)
        return self.model(forward_batch.input_ids, forward_batch.positions, forward_batch)

    def memory_used_bytes(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
