"""What the engine reports under data-parallel attention, model-free: ``get_state``'s totals over the DP ranks'
states, and the metrics' totals and per-DP-rank gauges from each rank's ``SchedulerStats``."""

from __future__ import annotations

import re

from radixlm.engine.scheduler_process import total_state
from radixlm.metrics import MetricsCollector
from radixlm.scheduler.stats import SchedulerStats


def state(running: int, available: int, evictable: int, retracted: int) -> dict:
    return {"num_running_reqs": running, "num_waiting_reqs": 1, "num_grammar_queue_reqs": 0,
            "max_total_num_tokens": 100, "available_kv_tokens": available, "cached_kv_tokens": evictable,
            "evictable_kv_tokens": evictable, "protected_kv_tokens": 0,
            "token_usage": round(1 - (available + evictable) / 100, 4), "num_retracted_reqs": retracted,
            "num_tracked_reqs": running + 1}


def test_total_state_sums_the_ranks():
    total = total_state([state(2, 50, 10, 1), state(0, 90, 10, 0)])
    assert total == {"num_running_reqs": 2, "num_waiting_reqs": 2, "num_grammar_queue_reqs": 0,
                     "max_total_num_tokens": 200, "available_kv_tokens": 140, "cached_kv_tokens": 20,
                     "evictable_kv_tokens": 20, "protected_kv_tokens": 0, "token_usage": 0.2,
                     "num_retracted_reqs": 1, "num_tracked_reqs": 4}


def stats(rank: int, running: int, used: int, hit: float) -> SchedulerStats:
    return SchedulerStats(num_running_reqs=running, num_queue_reqs=rank, num_grammar_queue_reqs=0,
                          num_used_tokens=used, token_usage=used / 100, max_total_num_tokens=100,
                          gen_throughput=10.0, cache_hit_rate=hit, gpu_memory_used_bytes=0,
                          num_retracted_reqs_total=rank, evicted_tokens_total=5, dp_rank=rank)


def sample(text: str, name: str, dp_rank: int | None = None) -> float:
    labels = 'model_name="m"' if dp_rank is None else f'dp_rank="{dp_rank}",model_name="m"'
    match = re.search(rf'^radixlm:{name}{{{labels}}} (\S+)$', text, re.M)
    assert match, (name, labels, text)
    return float(match.group(1))


def test_metrics_totals_and_per_dp_rank_gauges():
    metrics = MetricsCollector("m", dp_size=2)
    metrics.on_stats(stats(0, 3, 40, 0.5))
    metrics.on_stats(stats(1, 9, 90, 0.4))  # replaced by the next report of rank 1
    metrics.on_stats(stats(1, 1, 20, 0.1))
    text = metrics.render().decode()
    assert sample(text, "num_running_reqs") == 4
    assert sample(text, "num_used_tokens") == 60 and sample(text, "max_total_num_tokens") == 200
    assert sample(text, "token_usage") == 0.3 and sample(text, "gen_throughput") == 20
    assert abs(sample(text, "cache_hit_rate") - 0.3) < 1e-12
    assert sample(text, "num_retracted_reqs_total") == 1 and sample(text, "evicted_tokens_total") == 10
    assert sample(text, "num_running_reqs_per_dp_rank", dp_rank=0) == 3
    assert sample(text, "num_running_reqs_per_dp_rank", dp_rank=1) == 1
    assert sample(text, "num_queue_reqs_per_dp_rank", dp_rank=1) == 1
    assert sample(text, "token_usage_per_dp_rank", dp_rank=0) == 0.4


def test_metrics_without_dp_attention_are_the_one_schedulers():
    metrics = MetricsCollector("m")
    metrics.on_stats(stats(0, 3, 40, 0.5))
    text = metrics.render().decode()
    assert sample(text, "num_running_reqs") == 3 and sample(text, "token_usage") == 0.4
    assert "per_dp_rank" not in text
