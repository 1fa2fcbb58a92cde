"""Prometheus metrics (``--enable-metrics``, served at ``/metrics``), SGLang's core set under ``radixlm:``.

Everything is exported by the front-end process, from one registry, so several processes need no Prometheus
multiprocess mode: request-level counters and latency histograms are observed where tokens arrive (the
engine's receiver thread), and the scheduler's own numbers (load, memory, its lifetime totals) arrive as a
``SchedulerStats`` message twice a second and are exported as they were last reported.

Under data-parallel attention every DP rank reports its own ``SchedulerStats``: the unlabeled metrics are the
engine's totals (counts, tokens, throughput and memory summed; ``token_usage`` of the summed pools;
``cache_hit_rate`` the ranks' mean), and ``*_per_dp_rank`` gauges with a ``dp_rank`` label show each rank's load.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from radixlm.engine.io_struct import TokenOutput
    from radixlm.scheduler.stats import SchedulerStats
    from radixlm.engine.request_state import RequestState

PREFIX = "radixlm:"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 60.0, 120.0, 300.0)
_GAUGES = {  # SchedulerStats field -> (metric name, help)
    "num_running_reqs": ("num_running_reqs", "requests decoding or prefilling"),
    "num_queue_reqs": ("num_queue_reqs", "requests waiting for admission"),
    "num_grammar_queue_reqs": ("num_grammar_queue_reqs", "requests waiting for their grammar to compile"),
    "num_used_tokens": ("num_used_tokens", "KV tokens held by running requests and locked prefixes"),
    "token_usage": ("token_usage", "fraction of the KV pool in use (evictable cache counts as free)"),
    "gen_throughput": ("gen_throughput", "output tokens per second over the last half second"),
    "cache_hit_rate": ("cache_hit_rate", "cached / input tokens of recently admitted requests"),
    "max_total_num_tokens": ("max_total_num_tokens", "KV pool capacity in tokens"),
    "gpu_memory_used_bytes": ("gpu_memory_used_bytes", "GPU memory allocated by the scheduler (0 on CPU)"),
}
_PER_DP_RANK = {  # SchedulerStats field -> (metric name, help), exported per DP rank under DP attention
    "num_running_reqs": ("num_running_reqs_per_dp_rank", "requests decoding or prefilling on each DP rank"),
    "num_queue_reqs": ("num_queue_reqs_per_dp_rank", "requests waiting for admission on each DP rank"),
    "token_usage": ("token_usage_per_dp_rank", "fraction of each DP rank's KV pool in use"),
}
_COUNTERS = {
    "num_retracted_reqs_total": ("num_retracted_reqs", "requests retracted under memory pressure"),
    "evicted_tokens_total": ("evicted_tokens", "KV tokens evicted from the radix cache"),
}


class _SchedulerCollector:
    """Exports each DP rank's last ``SchedulerStats`` (one rank without DP attention) at scrape time."""

    def __init__(self, model_name: str, dp_size: int):
        self.model_name = model_name
        self.dp_size = dp_size
        self.by_rank: dict[int, "SchedulerStats"] = {}  # written by the receiver thread, replaced whole

    def collect(self):
        ranks = sorted(self.by_rank.items())
        if not ranks:
            return
        stats = total_stats([s for _, s in ranks])
        for field, (name, doc) in _GAUGES.items():
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric([self.model_name], float(getattr(stats, field)))
            yield family
        for field, (name, doc) in _COUNTERS.items():
            family = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric([self.model_name], float(getattr(stats, field)))
            yield family
        if self.dp_size == 1:
            return
        for field, (name, doc) in _PER_DP_RANK.items():
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name", "dp_rank"])
            for rank, rank_stats in ranks:
                family.add_metric([self.model_name, str(rank)], float(getattr(rank_stats, field)))
            yield family


def total_stats(per_rank: list["SchedulerStats"]) -> "SchedulerStats":
    """The engine's stats from its DP ranks' (the one rank's own without DP attention)."""
    if len(per_rank) == 1:
        return per_rank[0]
    summed = {f.name: sum(getattr(s, f.name) for s in per_rank) for f in dataclasses.fields(per_rank[0])}
    summed.update(token_usage=summed["num_used_tokens"] / max(summed["max_total_num_tokens"], 1),
                  cache_hit_rate=summed["cache_hit_rate"] / len(per_rank), dp_rank=0)
    return dataclasses.replace(per_rank[0], **summed)


class MetricsCollector:
    def __init__(self, model_name: str, dp_size: int = 1):
        self.registry = CollectorRegistry()
        self._scheduler = _SchedulerCollector(model_name, dp_size)
        self.registry.register(self._scheduler)
        label = {"labelnames": ["model_name"], "registry": self.registry}

        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + name, doc, **label).labels(model_name)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(PREFIX + name, doc, buckets=_LATENCY_BUCKETS, **label).labels(model_name)

        self.prompt_tokens = counter("prompt_tokens", "prompt tokens of finished requests")
        self.generation_tokens = counter("generation_tokens", "output tokens of finished requests")
        self.cached_tokens = counter("cached_tokens", "prompt tokens served from the radix cache")
        self.requests = counter("num_requests", "finished requests")
        self.aborted = counter("num_aborted_requests", "requests that ended by abort (client, error)")
        self.ttft = histogram("time_to_first_token_seconds", "arrival to first output token")
        self.itl = histogram("inter_token_latency_seconds", "time between output tokens")
        self.e2e = histogram("e2e_request_latency_seconds", "arrival to last output token")
        self.queue = histogram("queue_time_seconds", "arrival at the scheduler to admission")
        self.grammar = histogram("grammar_compilation_time_seconds", "arrival at the scheduler to compiled grammar")

    def on_stats(self, stats: "SchedulerStats") -> None:
        self._scheduler.by_rank = {**self._scheduler.by_rank, stats.dp_rank: stats}

    def on_output(self, state: "RequestState", out: "TokenOutput", now: float) -> None:
        """A message of new tokens for ``state`` (before the state records them) arrived at ``now``."""
        if out.queue_time is not None:
            self.queue.observe(out.queue_time)
        if out.grammar_time is not None:
            self.grammar.observe(out.grammar_time)
        if out.new_ids:
            if not state.output_ids:
                self.ttft.observe(now - state.created)
                gaps = len(out.new_ids) - 1  # tokens after the first in one message arrived together
                elapsed = 0.0
            else:
                gaps, elapsed = len(out.new_ids), now - state.last_token_time
            for _ in range(gaps):
                self.itl.observe(elapsed / max(gaps, 1))
            state.last_token_time = now

    def on_finish(self, state: "RequestState", now: float) -> None:
        self.e2e.observe(now - state.created)
        self.requests.inc()
        self.prompt_tokens.inc(state.prompt_tokens)
        self.generation_tokens.inc(len(state.output_ids))
        self.cached_tokens.inc(state.cached_tokens)
        if (state.finished_reason or {}).get("type") == "abort" or state.error is not None:
            self.aborted.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
