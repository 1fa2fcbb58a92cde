"""``ServerArgs``: every knob of the engine, with SGLang's flag names, defaults and validation in one place."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
from dataclasses import dataclass, field
from typing import Any, get_args, get_type_hints

import torch

from radixlm.utils.toolchain import cpu_kernels_buildable

API_KEY_ENV = "RADIXLM_API_KEY"  # the API key when --api-key is not given
LOAD_BALANCE_METHODS = ("round_robin", "shortest_queue", "prefix")  # radixlm.engine.dispatcher


def _arg(default: Any, help: str, choices: tuple[Any, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class ServerArgs:
    """Frozen after validation.  ``ServerArgs()`` is a valid configuration serving the embedded model."""

    # Model and tokenizer
    model_path: str | None = _arg(None, "HF-format model directory, or a preset name with --load-format dummy; "
                                        "empty means the embedded SmolLM2-135M-Instruct")
    tokenizer_path: str | None = _arg(None, "tokenizer directory (default: the model path)")
    load_format: str = _arg("auto", "how to get weights", ("auto", "safetensors", "dummy"))
    dtype: str = _arg("auto", "weight and activation dtype (auto: the checkpoint's; on GPU float32 checkpoints "
                              "run in bfloat16; on CPU bfloat16/float16 checkpoints keep their dtype only where "
                              "the CPU has it natively (avx512_bf16/amx_bf16, avx512_fp16/amx_fp16), else float32)",
                      ("auto", "bfloat16", "float16", "float32"))
    context_length: int | None = _arg(None, "maximum tokens per request (default: the model's)")
    served_model_name: str | None = _arg(None, "model name reported by the API (default: the model path)")
    chat_template: str | None = _arg(None, "chat template file or name overriding the tokenizer's")
    tool_call_parser: str = _arg("hermes", "format of the model's tool calls in /v1/chat/completions",
                                 ("hermes", "llama3"))
    quantization: str | None = _arg(None, "quantize a bf16/fp16 checkpoint's linear weights at load: fp8 (E4M3, one "
                                          "scale per output channel, activations per token); FP8 checkpoints "
                                          "(block-wise, DeepSeek-V3's format) are detected from config.json",
                                    (None, "fp8"))
    quantize_lm_head: bool = _arg(False, "with FP8 weights (--quantization fp8 or an FP8 checkpoint), quantize the LM "
                                         "head too (online, one scale per output channel): half its bytes, a "
                                         "Llama-8B batch-1 decode step ~0.1 ms faster on an H200, at a measured "
                                         "cost in logit accuracy (docs/benchmarks.md); off like SGLang's and "
                                         "vLLM's FP8, which leave the head in bf16")
    enable_fp8_mla_bmm: bool = _arg(False, "MLA models (DeepSeek-V2/V3): run the absorbed attention's per-head "
                                           "products with W_UK and W_UV in FP8 (E4M3; weights one scale per head, "
                                           "activations one dynamic scale per tensor); on an H200 slower than "
                                           "the bf16 products at every measured batch (docs/benchmarks.md, run I)")
    json_model_override_args: str = _arg("", "JSON object merged over the model's config.json, e.g. "
                                             "'{\"num_hidden_layers\": 4}' to time the first layers of a large "
                                             "model (checkpoint tensors of the layers cut off are skipped)")
    skip_tokenizer_init: bool = _arg(False, "load no tokenizer: requests carry input_ids, outputs carry output_ids "
                                            "and empty text (for models without a tokenizer, e.g. dummy presets)")

    # Hardware and memory
    device: str = _arg("auto", "where to run", ("auto", "cpu", "cuda"))
    tp_size: int = _arg(1, "tensor-parallel size")
    dp_size: int = _arg(1, "data parallelism.  Without --enable-dp-attention: this many independent replicas of the "
                           "server (`radixlm serve` only), each with --tp-size ranks on its own GPUs, behind the "
                           "cache-aware router on --host/--port (the --router-* flags).  With it: data-parallel "
                           "attention, the --tp-size ranks forming this many attention groups of consecutive "
                           "ranks, each with its own requests and KV cache; must divide --tp-size")
    enable_dp_attention: bool = _arg(False, "MLA models (DeepSeek-V2/V3): attention data-parallel over --dp-size "
                                            "groups (tensor-parallel over --tp-size / --dp-size ranks within one, "
                                            "with the embedding and LM head), the MoE and MLP layers "
                                            "tensor-parallel over all --tp-size ranks on every group's tokens")
    load_balance_method: str = _arg("shortest_queue", "with --enable-dp-attention, how the front end picks each "
                                                      "request's DP rank: round_robin; shortest_queue (fewest "
                                                      "unfinished requests, then tokens); prefix (the rank that "
                                                      "most likely caches the prompt's longest prefix, unless its "
                                                      "queue is much longer than the shortest)",
                                    LOAD_BALANCE_METHODS)
    base_gpu_id: int = _arg(0, "the first GPU this server uses: TP rank r runs on GPU --base-gpu-id + r (on each node, "
                               "counting that node's ranks from 0); --dp-size replica i starts at --base-gpu-id + "
                               "i * --tp-size")
    mem_fraction_static: float | None = _arg(None, "fraction of GPU memory for weights + KV cache (GPU default 0.88)")
    max_total_tokens: int | None = _arg(None, "KV-cache capacity in tokens (default: sized from memory)")
    page_size: int = _arg(1, "tokens per KV page")
    attention_backend: str = _arg("auto", "attention implementation (auto: triton on CUDA; on CPU the C kernels "
                                          "(cpu) where a C compiler is found, else torch_native)",
                                  ("auto", "torch_native", "triton", "cpu"))
    kv_cache_dtype: str = _arg("auto", "KV cache dtype (auto: float32 for torch_native attention on CPU, which "
                                       "computes in float32, else the model dtype; fp8_e4m3 / fp8_e5m2: one byte a "
                                       "value with per-layer K and V scales from the checkpoint (k_scale / "
                                       "v_scale / kv_scale tensors; 1.0 without them), twice the tokens of bf16, "
                                       "out-of-range values saturate; on CPU attention then runs torch_native)",
                               ("auto", "bfloat16", "float16", "float32", "fp8_e4m3", "fp8_e5m2"))

    # Scheduling
    max_running_requests: int | None = _arg(None, "maximum requests decoding at once")
    max_prefill_tokens: int = _arg(16384, "token budget of one prefill batch")
    chunked_prefill_size: int = _arg(8192, "split prompts longer than this into chunks (-1 disables)")
    enable_mixed_chunk: bool = _arg(False, "run prefill chunks together with the running requests' decode tokens in "
                                           "one forward (MIXED), so a long prompt does not stall decoding")
    schedule_policy: str = _arg("fcfs", "order of the waiting queue", ("fcfs", "lpm"))
    schedule_conservativeness: float = _arg(1.0, "how much decode memory to reserve when admitting requests")
    disable_radix_cache: bool = _arg(False, "turn off prefix caching")
    grammar_backend: str = _arg("xgrammar", "structured output (json_schema, regex, ebnf) implementation",
                                ("xgrammar", "none"))
    grammar_compile_timeout: float = _arg(30.0, "seconds a request's grammar may take to compile; beyond, the "
                                                "request fails with a 400 and the compilation is abandoned")

    # GPU execution
    cuda_graph_max_bs: int | None = _arg(None, "largest decode batch replayed from a CUDA graph (default: 256, "
                                               "at most --max-running-requests)")
    disable_cuda_graph: bool = _arg(False, "run decode eagerly")
    disable_overlap_schedule: bool = _arg(False, "read each decode step's tokens before launching the next "
                                                 "(default: launch the next step first, overlapping CPU and GPU)")

    # Serving
    host: str = _arg("127.0.0.1", "HTTP host")
    port: int = _arg(30000, "HTTP port")
    api_key: str | None = _arg(None, "require this bearer token on every route but /health (default: the "
                                     "RADIXLM_API_KEY environment variable, which keeps it out of `ps`)")
    max_queued_requests: int | None = _arg(None, "most requests queued at once (submitted, no output token yet; "
                                                 "a request with n choices counts n); beyond it 503 with "
                                                 "Retry-After (default: unlimited)")
    max_request_body_bytes: int = _arg(32 * 1024 * 1024, "largest HTTP request body; larger ones get 413")
    watchdog_timeout: float = _arg(300.0, "seconds a scheduler step may make no progress while requests are in "
                                          "flight before the stacks are logged and the server exits non-zero "
                                          "(0: no watchdog)")
    graceful_shutdown_timeout: float = _arg(25.0, "on SIGTERM, seconds in-flight requests may take to finish "
                                                  "before they are aborted (new ones get 503 meanwhile)")
    log_level: str = _arg("info", "logging level", ("debug", "info", "warning", "error"))
    log_requests: bool = _arg(False, "log every finished request: one key=value line each")
    decode_log_interval: int = _arg(40, "log a load line every this many scheduler steps (0: never)")
    enable_metrics: bool = _arg(False, "expose Prometheus metrics at /metrics")
    random_seed: int | None = _arg(None, "seed for weights (dummy), sampling and anything random")

    # LoRA adapters (radixlm.lora)
    enable_lora: bool = _arg(False, "serve LoRA adapters (PEFT format) on the base model: each request may name one "
                                    "(native lora_path, OpenAI model \"<base>:<adapter>\"), requests of different "
                                    "adapters share a batch; implied by --lora-paths")
    lora_paths: tuple[str, ...] | None = _arg(None, "adapters loaded at startup, as name=path (or a path, named by "
                                                    "itself); more can be loaded live with /load_lora_adapter")
    max_loras_per_batch: int = _arg(8, "adapters resident on the device at once (the adapter memory pool's slots): "
                                       "the most distinct adapters among the running requests; others wait in host "
                                       "memory")
    max_lora_rank: int | None = _arg(None, "largest adapter rank served (the pool's width; default: the largest "
                                           "rank among --lora-paths, 64 without any)")
    lora_target_modules: tuple[str, ...] | None = _arg(None, "projections adapters may modify, among q_proj k_proj "
                                                              "v_proj o_proj gate_proj up_proj down_proj, or all "
                                                              "(default: all; fewer save pool memory)")
    lora_allowed_dir: str | None = _arg(None, "load adapters only from inside this directory (symlinks resolved); "
                                              "default: any path the server can read")

    # Distributed
    dist_init_addr: str | None = _arg(None, "host:port of TP rank 0 for torch.distributed (default: a free local "
                                            "port); with --nnodes > 1 required, an address of node 0 the other "
                                            "nodes reach, and port + 1 there carries the schedulers' outputs")
    nnodes: int = _arg(1, "number of nodes the --tp-size ranks are spread over (--tp-size / --nnodes each)")
    node_rank: int = _arg(0, "this node's rank in 0..--nnodes - 1: node 0 runs the HTTP server (or Engine) and TP "
                             "ranks 0.., the others only their TP ranks' scheduler processes")
    dist_timeout: float | None = _arg(None, "seconds torch.distributed waits for the other ranks, at its "
                                            "initialization (a node that never joins) and in collectives "
                                            "(default: torch's, 10 minutes)")

    def __post_init__(self) -> None:
        problems = []
        if self.tp_size < 1:
            problems.append(f"--tp-size must be >= 1, got {self.tp_size}")
        if self.dp_size < 1:
            problems.append(f"--dp-size must be >= 1, got {self.dp_size}")
        elif self.dp_replicas and self.nnodes > 1:
            problems.append(f"--dp-size {self.dp_size} without --enable-dp-attention runs replicas on one node; across "
                            f"nodes (--nnodes {self.nnodes}) run a `radixlm serve` per node and `radixlm router "
                            "--worker-urls ...` in front of them")
        elif self.dp_replicas and self.dist_init_addr is not None:
            problems.append(f"--dp-size {self.dp_size} without --enable-dp-attention takes no --dist-init-addr: each "
                            "replica picks a free local port of its own")
        elif self.enable_dp_attention and self.dp_size == 1:
            problems.append("--enable-dp-attention needs --dp-size >= 2, got 1 (that is plain tensor parallelism)")
        elif self.enable_dp_attention and self.tp_size >= 1 and self.tp_size % self.dp_size:
            problems.append(f"--dp-size {self.dp_size} must divide --tp-size {self.tp_size}")
        if self.dist_timeout is not None and not self.dist_timeout > 0:
            problems.append(f"--dist-timeout must be > 0 seconds, got {self.dist_timeout}")
        if self.nnodes < 1:
            problems.append(f"--nnodes must be >= 1, got {self.nnodes}")
        elif not 0 <= self.node_rank < self.nnodes:
            problems.append(f"--node-rank must be in 0..{self.nnodes - 1} (--nnodes {self.nnodes}), "
                            f"got {self.node_rank}")
        elif self.tp_size >= 1 and self.tp_size % self.nnodes:
            problems.append(f"--tp-size {self.tp_size} must be divisible by --nnodes {self.nnodes} (the same number "
                            "of TP ranks on every node)")
        if self.nnodes > 1 and not self.dist_init_addr:
            problems.append(f"--nnodes {self.nnodes} needs --dist-init-addr: host:port of node 0, reachable from "
                            "every node")
        elif self.dist_init_addr is not None and not _is_host_port(self.dist_init_addr):
            problems.append(f"--dist-init-addr must be host:port with a port in 1..65534, "
                            f"got {self.dist_init_addr!r}")
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            problems.append(f"--page-size must be a power of two >= 1, got {self.page_size}")
        if self.mem_fraction_static is not None and not 0.0 < self.mem_fraction_static < 1.0:
            problems.append(f"--mem-fraction-static must be in (0, 1), got {self.mem_fraction_static}")
        for name in ("max_total_tokens", "context_length", "max_running_requests", "cuda_graph_max_bs",
                     "max_queued_requests", "max_request_body_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.max_prefill_tokens < 1:
            problems.append(f"--max-prefill-tokens must be >= 1, got {self.max_prefill_tokens}")
        if self.chunked_prefill_size == 0 or self.chunked_prefill_size < -1:
            problems.append(f"--chunked-prefill-size must be positive or -1, got {self.chunked_prefill_size}")
        if not self.grammar_compile_timeout > 0:
            problems.append(f"--grammar-compile-timeout must be > 0, got {self.grammar_compile_timeout}")
        if self.schedule_conservativeness <= 0:
            problems.append(f"--schedule-conservativeness must be > 0, got {self.schedule_conservativeness}")
        for name in ("watchdog_timeout", "graceful_shutdown_timeout"):
            if not getattr(self, name) >= 0:  # NaN too
                problems.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        try:
            overrides = json.loads(self.json_model_override_args or "{}")
            if not isinstance(overrides, dict):
                problems.append(f"--json-model-override-args must be a JSON object, got {self.json_model_override_args!r}")
        except json.JSONDecodeError as e:
            problems.append(f"--json-model-override-args is not valid JSON ({e})")
        if not 0 < self.port < 65536:
            problems.append(f"--port must be in 1..65535, got {self.port}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                problems.append(f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}; "
                                f"got {getattr(self, f.name)!r}")
        if self.base_gpu_id < 0:
            problems.append(f"--base-gpu-id must be >= 0, got {self.base_gpu_id}")
        if self.device == "cuda" and not torch.cuda.is_available():
            problems.append("--device cuda was asked for but torch sees no CUDA device")
        elif (self.device != "cpu" and torch.cuda.is_available() and self.tp_size >= 1 and self.dp_size >= 1
              and self.nnodes >= 1):
            gpus = self.tp_size_per_node * (self.dp_size if self.dp_replicas else 1)
            if self.base_gpu_id + gpus > torch.cuda.device_count():
                problems.append(f"GPUs {self.base_gpu_id}..{self.base_gpu_id + gpus - 1} are needed (--base-gpu-id "
                                f"{self.base_gpu_id}, {gpus} = --tp-size / --nnodes"
                                + (" x --dp-size" if self.dp_replicas else "")
                                + f") but torch sees {torch.cuda.device_count()}")
        problems += self._lora_problems()
        if problems:
            raise ValueError("invalid server arguments:\n  " + "\n  ".join(problems))
        # Resolve the derived defaults once so every process sees the same values.
        if self.lora_paths and not self.enable_lora:
            object.__setattr__(self, "enable_lora", True)
        if self.device == "auto":
            object.__setattr__(self, "device", "cuda" if torch.cuda.is_available() else "cpu")
        if self.api_key is None and os.environ.get(API_KEY_ENV):
            object.__setattr__(self, "api_key", os.environ[API_KEY_ENV])
        if self.random_seed is None:
            object.__setattr__(self, "random_seed", random.randint(0, 2**30))
        # Judged without compiling (constructing ServerArgs must stay cheap): the kernels are built where they are
        # first used, and if that build fails they log why and the torch code runs instead.
        buildable = self.device == "cpu" and cpu_kernels_buildable()
        if self.attention_backend == "auto":
            object.__setattr__(self, "attention_backend", "triton" if self.device == "cuda" else (
                "cpu" if buildable else "torch_native"))
        if self.attention_backend == "cpu" and not buildable:
            raise ValueError("invalid server arguments:\n  --attention-backend cpu needs --device cpu and a C "
                             "compiler to build radixlm's CPU kernels (and RADIXLM_DISABLE_CPU_KERNELS unset)")

    def _lora_problems(self) -> list[str]:
        from radixlm.lora.adapter import SUPPORTED_MODULES

        problems = []
        if self.max_loras_per_batch < 1:
            problems.append(f"--max-loras-per-batch must be >= 1, got {self.max_loras_per_batch}")
        if self.max_lora_rank is not None and self.max_lora_rank < 1:
            problems.append(f"--max-lora-rank must be >= 1, got {self.max_lora_rank}")
        for module in self.lora_target_modules or ():
            if module != "all" and module not in SUPPORTED_MODULES:
                problems.append(f"--lora-target-modules: unknown module {module!r}; choose among "
                                f"{', '.join(SUPPORTED_MODULES)} or all")
        try:
            self.lora_path_map()
        except ValueError as e:
            problems.append(str(e))
        if self.enable_lora or self.lora_paths:
            if self.quantization is not None:
                problems.append("--enable-lora does not combine with --quantization yet (the FP8 layers take their "
                                "input quantized, which the adapters' shrink cannot read)")
            if self.enable_dp_attention:
                problems.append("--enable-lora does not combine with --enable-dp-attention")
        return problems

    def lora_path_map(self) -> dict[str, str]:
        """``--lora-paths`` as {adapter name: path}, in order (ValueError for an empty or repeated name)."""
        out: dict[str, str] = {}
        for entry in self.lora_paths or ():
            name, sep, path = entry.partition("=")
            if not sep:
                name = path = entry
            if not name or not path:
                raise ValueError(f"--lora-paths entry {entry!r} must be name=path or a path")
            if name in out:
                raise ValueError(f"--lora-paths names adapter {name!r} twice")
            out[name] = path
        return out

    def lora_target_module_set(self) -> frozenset[str]:
        """The modules adapters may modify (``--lora-target-modules``, ``all`` or unset: every supported one)."""
        from radixlm.lora.adapter import SUPPORTED_MODULES

        mods = self.lora_target_modules
        return frozenset(SUPPORTED_MODULES if not mods or "all" in mods else mods)

    @property
    def dp_replicas(self) -> bool:
        """``--dp-size`` > 1 without ``--enable-dp-attention``: that many whole-server replicas behind the router
        (radixlm.server.replicas); an ``Engine`` refuses it."""
        return self.dp_size > 1 and not self.enable_dp_attention

    @property
    def tp_size_per_node(self) -> int:
        return self.tp_size // self.nnodes

    def local_tp_ranks(self) -> range:
        """The TP ranks whose scheduler processes run on this node (``--node-rank``)."""
        return range(self.node_rank * self.tp_size_per_node, (self.node_rank + 1) * self.tp_size_per_node)

    def model_overrides(self) -> dict[str, Any]:
        """``--json-model-override-args`` parsed (validated in ``__post_init__``)."""
        return json.loads(self.json_model_override_args or "{}")

    def replace(self, **changes: Any) -> "ServerArgs":
        return dataclasses.replace(self, **changes)

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        """Add one ``--flag-name`` per field; booleans are switches."""
        hints = get_type_hints(ServerArgs)
        for f in dataclasses.fields(ServerArgs):
            flag = "--" + f.name.replace("_", "-")
            kwargs: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"], "default": f.default}
            kind = next((t for t in get_args(hints[f.name]) if t is not type(None)), hints[f.name])
            if kind is bool:
                parser.add_argument(flag, action="store_true", **kwargs)
                continue
            if getattr(kind, "__origin__", None) is tuple:  # a list flag: --lora-paths a=x b=y
                kwargs["nargs"] = "+"
                kind = str
            kwargs["type"] = kind
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
            if f.name == "model_path":
                kwargs["nargs"] = "?"  # a bare --model-path means the embedded model
                kwargs["const"] = None
            parser.add_argument(flag, **kwargs)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "ServerArgs":
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _is_host_port(addr: str) -> bool:
    """``host:port`` (IPv6 in brackets) with a port that leaves port + 1 (the multi-node output socket) valid."""
    host, sep, port = addr.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65535)
