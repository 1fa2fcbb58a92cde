"""Prometheus metrics and logs through a live server: every name present, counters exact after a known
workload, cache hits counted on shared prefixes, histograms populated, request and load log lines."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

import pytest
from server_harness import LiveServer

GAUGES = ["num_running_reqs", "num_queue_reqs", "num_grammar_queue_reqs", "num_used_tokens", "token_usage",
          "gen_throughput", "cache_hit_rate", "max_total_num_tokens", "gpu_memory_used_bytes"]
COUNTERS = ["prompt_tokens_total", "generation_tokens_total", "cached_tokens_total", "num_requests_total",
            "num_aborted_requests_total", "num_retracted_reqs_total", "evicted_tokens_total"]
HISTOGRAMS = ["time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
              "queue_time_seconds", "grammar_compilation_time_seconds"]


def scrape(server) -> dict[str, float]:
    text = urllib.request.urlopen(server.base + "/metrics", timeout=30).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r'radixlm:(\w+)\{model_name="([^"]+)"(?:,le="[^"]+")?\} (\S+)', line)
        if m and "_bucket" not in m.group(1):
            assert m.group(2) == "SmolLM2-135M-Instruct"
            out[m.group(1)] = float(m.group(3))
    return out


@pytest.fixture(scope="module")
def server():
    s = LiveServer("--max-total-tokens", "8192", "--enable-metrics", "--log-requests", "--decode-log-interval", "4",
                   "--log-level", "info")
    yield s
    assert s.stop() == 0


def test_metrics_after_a_known_workload(server):
    shared = list(range(1000, 1048))  # 48 shared prompt tokens
    prompts = [shared + [2000 + i, 2100 + i, 2200 + i] for i in range(4)]
    params = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
    status, first = server.request("POST", "/generate", {"input_ids": prompts[0], "sampling_params": params})
    assert status == 200
    status, rest = server.request("POST", "/generate", {"input_ids": prompts[1:], "sampling_params": params})
    assert status == 200
    outs = [first] + rest
    status, _ = server.request("POST", "/generate", {"text": "Date: ", "sampling_params": {
        "regex": r"20[0-9]{2}", "max_new_tokens": 8, "temperature": 0}})
    assert status == 200

    # an aborted request
    def long_request():
        server.request("POST", "/generate", {"text": "Tell a story.", "rid": "victim",
                                             "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}})
    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(1.0)
    assert server.request("POST", "/abort_request", {"rid": "victim"})[0] == 200
    thread.join(60)
    time.sleep(1.2)  # one scheduler stats message later

    m = scrape(server)
    for name in GAUGES + COUNTERS + [f"{h}_{s}" for h in HISTOGRAMS for s in ("count", "sum")]:
        assert name in m, name
    assert m["max_total_num_tokens"] == 8192 and m["num_running_reqs"] == 0 and m["num_queue_reqs"] == 0
    assert m["num_requests_total"] == 6 and m["num_aborted_requests_total"] == 1
    exact_prompt = sum(len(p) for p in prompts)
    exact_output = 4 * 6
    assert m["prompt_tokens_total"] > exact_prompt and m["generation_tokens_total"] > exact_output  # + regex, abort
    cached = sum(o["meta_info"]["cached_tokens"] for o in outs)
    assert cached >= 3 * 47  # the three later prompts found the shared prefix
    assert m["cached_tokens_total"] >= cached
    assert m["time_to_first_token_seconds_count"] == 6 and m["e2e_request_latency_seconds_count"] == 6
    assert m["queue_time_seconds_count"] == 6 and m["grammar_compilation_time_seconds_count"] == 1
    assert m["inter_token_latency_seconds_count"] >= 4 * 5
    assert 0 < m["time_to_first_token_seconds_sum"] < m["e2e_request_latency_seconds_sum"]


def test_token_counters_are_exact(server):
    before = scrape(server)
    prompts = [[5000 + i] * (10 + i) for i in range(3)]
    status, outs = server.request("POST", "/generate", {"input_ids": prompts, "sampling_params": {
        "max_new_tokens": 5, "temperature": 0, "ignore_eos": True}})
    assert status == 200
    after = scrape(server)
    assert after["prompt_tokens_total"] - before["prompt_tokens_total"] == sum(map(len, prompts))
    assert after["generation_tokens_total"] - before["generation_tokens_total"] == 15
    assert after["num_requests_total"] - before["num_requests_total"] == 3
    assert after["cached_tokens_total"] - before["cached_tokens_total"] == sum(
        o["meta_info"]["cached_tokens"] for o in outs)


def test_log_lines(server):
    server.request("POST", "/generate", {"text": "Hello", "sampling_params": {"max_new_tokens": 12,
                                                                               "ignore_eos": True}})
    log = server.stop_and_read_output()
    assert re.search(r"request finished: rid=\w+ finish=\{.*\} prompt_tokens=\d+ completion_tokens=12 "
                     r"cached_tokens=\d+ e2e_latency=[\d.]+", log), log[-2000:]
    assert re.search(r"load: running=\d+ queued=\d+ grammar_queued=\d+ token_usage=[\d.]+ cache_hit_rate=[\d.]+ "
                     r"gen_throughput=[\d.]+ retracted=\d+", log), log[-2000:]


def test_metrics_off_by_default():
    s = LiveServer("--max-total-tokens", "2048")
    try:
        assert s.request("GET", "/metrics")[0] == 404
    finally:
        assert s.stop() == 0


def test_memory_pressure_counters():
    """A tiny KV pool: distinct prompts one after another evict each other's cache, a concurrent burst with a
    low reserve retracts; both counters move."""
    s = LiveServer("--max-total-tokens", "128", "--enable-metrics", "--chunked-prefill-size", "32",
                   "--schedule-conservativeness", "0.3")
    try:
        params = {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}
        for i in range(4):
            assert s.request("POST", "/generate", {"input_ids": [3000 + 50 * i + j for j in range(40)],
                                                   "sampling_params": params})[0] == 200
        burst = [[4000 + 50 * i + j for j in range(24)] for i in range(4)]
        status, outs = s.request("POST", "/generate", {"input_ids": burst, "sampling_params": {
            "max_new_tokens": 40, "temperature": 0, "ignore_eos": True}})
        assert status == 200 and all(o["meta_info"]["completion_tokens"] == 40 for o in outs)
        time.sleep(1.2)
        m = scrape(s)
        assert m["evicted_tokens_total"] > 0 and m["num_retracted_reqs_total"] > 0, m
    finally:
        assert s.stop() == 0
