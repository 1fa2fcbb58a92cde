"""The short fuzz run of CI: ``CASES`` calls drawn from the live server's ``/openapi.json`` over every route (valid
bodies and mutated ones, ``fuzz_cases.cases``), derandomized so every run sends the same cases; each reply must keep
``api_fuzz.check``'s invariants, and the server must be healthy and idle afterwards.  Then the live halves of the
fuzz findings' regressions.  The long run is ``bench/fuzz.py``."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings

import api_fuzz
import fuzz_cases

CASES = 250


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    live = api_fuzz.FuzzServer(api_fuzz.tiny_model_dir(str(tmp_path_factory.mktemp("tiny-llama"))))
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="module")
def spec(server: api_fuzz.FuzzServer) -> dict:
    reply = api_fuzz.call(server.port, fuzz_cases.Case("GET", "/openapi.json", None, None, "spec"))
    assert reply.status == 200
    return json.loads(reply.body)


def test_fuzz_every_route(server: api_fuzz.FuzzServer, spec: dict) -> None:
    routes = fuzz_cases.operations(spec)
    assert len(routes) >= 13  # every POST and GET route of app.py
    seen: set[tuple[str, str]] = set()

    @settings(max_examples=CASES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=fuzz_cases.cases(spec))
    def one_call(case: fuzz_cases.Case) -> None:
        seen.add((case.method, case.path))
        api_fuzz.check(case, api_fuzz.call(server.port, case))

    one_call()
    assert seen == set(routes)
    api_fuzz.assert_idle(server.port)


def post(server: api_fuzz.FuzzServer, path: str, body: bytes) -> tuple[int, bytes]:
    reply = api_fuzz.call(server.port, fuzz_cases.Case("POST", path, body, "application/json", "regression"))
    return reply.status, reply.body


@pytest.mark.parametrize("stream", [False, True])
def test_masked_top_logprobs_are_strict_json(server: api_fuzz.FuzzServer, stream: bool) -> None:
    """Found by the fuzzer: logprobs with a grammar were a 500 (and -Infinity in a stream).  After "no" the grammar
    allows only the end of text, so the masked alternatives (-inf) are left out of the top list."""
    body = {"prompt": "x", "max_tokens": 4, "temperature": 0, "regex": "(yes|no)", "logprobs": 5, "stream": stream}
    status, raw = post(server, "/v1/completions", json.dumps(body).encode())
    assert status == 200
    if stream:
        chunks = [api_fuzz.strict_json(line[6:]) for line in raw.decode().split("\n")
                  if line.startswith("data: {")]
        tops = [top for c in chunks for top in c["choices"][0]["logprobs"]["top_logprobs"]]
    else:
        tops = api_fuzz.strict_json(raw)["choices"][0]["logprobs"]["top_logprobs"]
    last = tops[-1]
    assert list(last) == ["<|im_end|>"] and all(v > -9999.0 for top in tops for v in top.values()), tops


@pytest.mark.parametrize("extra", ['"repetition_penalty": 5e-324', '"top_p": 5e-324'])
def test_tiny_penalty_or_top_p_with_a_grammar_finishes(server: api_fuzz.FuzzServer, extra: str) -> None:
    """Found by the fuzzer: repetition_penalty or top_p 5e-324 (0 in float32) made NaN or all-zero probabilities,
    an arbitrary token was sampled, and the grammar request aborted."""
    body = b'{"prompt": "x", "max_tokens": 1, "ebnf": "root ::= \\"yes\\" | \\"no\\"", ' + extra.encode() + b"}"
    status, raw = post(server, "/v1/completions", body)
    assert status == 200
    choice = api_fuzz.strict_json(raw)["choices"][0]
    assert choice["finish_reason"] in ("length", "stop") and choice["text"] in ("y", "ye", "yes", "n", "no")
