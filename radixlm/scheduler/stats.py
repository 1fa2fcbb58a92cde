"""What the scheduler reports about itself: live load (``/get_server_info``) and rates for metrics and logs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoadMark:
    """The scheduler's totals at one moment, from which ``Scheduler.stats`` computes rates."""

    time: float  # time.monotonic()
    generated: int
    admitted_input: int
    admitted_cached: int


@dataclass
class SchedulerStats:
    """The scheduler's load, memory and totals (``Scheduler.stats``), sent twice a second for metrics."""

    num_running_reqs: int
    num_queue_reqs: int
    num_grammar_queue_reqs: int
    num_used_tokens: int
    token_usage: float
    max_total_num_tokens: int
    gen_throughput: float  # output tokens per second since the previous stats
    cache_hit_rate: float  # cached / input tokens of the requests admitted since the previous stats
    gpu_memory_used_bytes: int
    num_retracted_reqs_total: int
    evicted_tokens_total: int
    dp_rank: int = 0  # data-parallel attention: the DP rank these are of (each DP rank reports its own)
