"""Logprobs of impossible tokens (a grammar's or min_tokens' -inf) reach the host as JSON-safe values."""

import json
import math

import torch

from radixlm.sampling.logprobs import LOGPROB_FLOOR, LogprobOptions, LogprobTensors

INF = float("inf")


def test_forbidden_tokens_leave_the_top_list_and_named_ones_are_floored():
    # row 0: a grammar allows tokens 1 and 3 only; row 1: nothing allowed (log_softmax of all -inf is NaN)
    logprobs = torch.tensor([[-INF, -0.25, -INF, -1.5, -INF],
                             [math.nan] * 5])
    options = LogprobOptions(top_logprobs_num=4, token_ids_logprob=[0, 3])
    values = LogprobTensors.of(logprobs, [1, 0], options).values()
    assert values.token_logprobs == [(-0.25, 1), (LOGPROB_FLOOR, 0)]
    assert values.top == [[(-0.25, 1), (-1.5, 3)], []]
    assert values.by_ids == [[(LOGPROB_FLOOR, 0), (-1.5, 3)], [(LOGPROB_FLOOR, 0), (LOGPROB_FLOOR, 3)]]
    json.dumps([values.token_logprobs, values.top, values.by_ids], allow_nan=False)  # what the server sends


def test_finite_logprobs_pass_unchanged():
    logprobs = torch.log_softmax(torch.tensor([[0.5, 2.0, -1.0]]), dim=-1)
    values = LogprobTensors.of(logprobs, [2], LogprobOptions(top_logprobs_num=3)).values()
    expected = logprobs[0].tolist()
    assert values.token_logprobs == [(expected[2], 2)]
    assert values.top == [[(expected[1], 1), (expected[0], 0), (expected[2], 2)]]
