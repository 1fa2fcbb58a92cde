"""Prometheus metrics (``--enable-metrics``, served at ``/metrics``), SGLang's core set under ``radixlm:``.

Everything is exported by the front-end process, from one registry, so several processes need no Prometheus
multiprocess mode: request-level counters and latency histograms are observed where tokens arrive (the
engine's receiver thread), and the scheduler's own numbers (load, memory, its lifetime totals) arrive as a
``SchedulerStats`` message twice a second and are exported as they were last reported.
"""

from __future__ import annotations

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
_COUNTERS = {
    "num_retracted_reqs_total": ("num_retracted_reqs", "requests retracted under memory pressure"),
    "evicted_tokens_total": ("evicted_tokens", "KV tokens evicted from the radix cache"),
}


class _SchedulerCollector:
    """Exports the last ``SchedulerStats`` at scrape time."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.stats: "SchedulerStats | None" = None

    def collect(self):
        stats = self.stats
        if stats is None:
            return
        for field, (name, doc) in _GAUGES.items():
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric([self.model_name], float(getattr(stats, field)))
            yield family
        for field, (name, doc) in _COUNTERS.items():
            family = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric([self.model_name], float(getattr(stats, field)))
            yield family


class MetricsCollector:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        self._scheduler = _SchedulerCollector(model_name)
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
        self._scheduler.stats = stats

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
