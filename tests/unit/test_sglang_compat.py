"""What SGLang's router (``sglang-router``) needs of a worker, in process: ``/get_load``'s report from the
schedulers' state, and the fields it adds to every forwarded body at their no-op values, which are not unknown
fields (``protocol.NEUTRAL_FIELDS``).  The router itself in front of real workers: tests/e2e/test_sglang_router.py."""

from __future__ import annotations

import logging

import pytest
from test_scheduler_model_free import make, req

from radixlm.server.native_api import load_report
from radixlm.server.protocol import ChatCompletionRequest, CompletionRequest, GenerateRequestBody

# Bodies as sglang-router 0.3.2 forwards them (recorded in front of a logging mock worker).
ROUTED_GENERATE = {"text": "Hello world", "model": None, "sampling_params": {"max_new_tokens": 4},
                   "return_text_in_logprobs": False, "stream": False, "log_metrics": True,
                   "return_hidden_states": False, "background": False, "no_logs": False, "return_bytes": False,
                   "return_entropy": False}
ROUTED_CHAT = {"messages": [{"role": "user", "content": "Hi"}], "model": "m", "logprobs": False,
               "max_completion_tokens": 4, "stream": False, "no_stop_trim": False, "ignore_eos": False,
               "continue_final_message": False, "skip_special_tokens": True, "separate_reasoning": True,
               "stream_reasoning": True, "return_hidden_states": False}
ROUTED_COMPLETION = {"model": "m", "prompt": "Hello", "max_tokens": 4, "stream": False, "echo": False,
                     "no_stop_trim": False, "ignore_eos": False, "skip_special_tokens": True,
                     "return_hidden_states": False}


def test_load_report_counts_queued_prompts_and_held_kv() -> None:
    sched, _ = make(max_total_tokens=256, max_running_requests=1)
    prompts = [[1, 2, 3, 4, 5], [9] * 7, [20 + i for i in range(9)]]
    for i, p in enumerate(prompts):
        sched.add_request(req(f"r{i}", p, max_new=4))
    assert load_report(sched.state()) == [{"dp_rank": 0, "num_reqs": 3, "num_waiting_reqs": 3, "num_tokens": 21}]
    sched.step()  # r0 admitted alone (max_running_requests=1): its prompt's KV is held, the others wait
    state = sched.state()
    held = state["max_total_num_tokens"] - state["available_kv_tokens"] - state["evictable_kv_tokens"]
    assert held >= 5
    assert load_report(state) == [{"dp_rank": 0, "num_reqs": 3, "num_waiting_reqs": 2, "num_tokens": held + 16}]
    for _ in range(200):
        if sched.is_idle():
            break
        sched.step()
    # finished: their prefixes stay cached, evictable, so no load is left
    assert load_report(sched.state()) == [{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}]


def test_load_report_has_one_entry_per_dp_rank() -> None:
    def rank(running: int, waiting: int, grammar: int, available: int, evictable: int, waiting_tokens: int) -> dict:
        return {"num_running_reqs": running, "num_waiting_reqs": waiting, "num_grammar_queue_reqs": grammar,
                "max_total_num_tokens": 100, "available_kv_tokens": available, "evictable_kv_tokens": evictable,
                "num_waiting_tokens": waiting_tokens}

    state = {"dp": [rank(2, 1, 1, 50, 10, 30), rank(0, 0, 0, 90, 10, 0)]}
    assert load_report(state) == [{"dp_rank": 0, "num_reqs": 4, "num_waiting_reqs": 2, "num_tokens": 70},
                                  {"dp_rank": 1, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}]


def test_the_fields_sglang_router_adds_are_not_unknown(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="radixlm.server.protocol"):
        GenerateRequestBody.model_validate(ROUTED_GENERATE)
        ChatCompletionRequest.model_validate(ROUTED_CHAT)
        CompletionRequest.model_validate(ROUTED_COMPLETION)
    assert caplog.records == []
    # the same names asking for something this server does not do are unknown fields, as any other
    with caplog.at_level(logging.WARNING, logger="radixlm.server.protocol"):
        GenerateRequestBody.model_validate({**ROUTED_GENERATE, "return_entropy": True, "log_metrics": 1})
        ChatCompletionRequest.model_validate({**ROUTED_CHAT, "continue_final_message": True})
    assert [r.getMessage() for r in caplog.records] == [
        "ignoring unknown field 'log_metrics' in /generate requests",
        "ignoring unknown field 'return_entropy' in /generate requests",
        "ignoring unknown field 'continue_final_message' in /v1/chat/completions requests"]
