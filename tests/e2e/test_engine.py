"""The offline Engine end to end: scheduler in its own process, ZMQ, detokenization, stop strings, batches."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

import radixlm
from radixlm.executor.static_batch import generate_static
from radixlm.sampling import SamplingParams


@pytest.fixture(scope="module")
def engine():
    with radixlm.Engine(max_total_tokens=4096, random_seed=0, dtype="float32") as e:  # as embedded_runner
        yield e


def test_single_prompt_matches_static_batch(engine, embedded_worker):
    out = engine.generate("The capital of France is", {"max_new_tokens": 12, "temperature": 0})
    ids = engine.tokenizer("The capital of France is").input_ids
    ref = generate_static(embedded_worker, [ids], SamplingParams(temperature=0, max_new_tokens=12))[0]
    assert out["output_ids"] == ref
    assert out["text"] == engine.tokenizer.decode(ref, skip_special_tokens=True)
    meta = out["meta_info"]
    assert meta["prompt_tokens"] == len(ids) and meta["completion_tokens"] == len(ref)
    assert meta["finish_reason"]["type"] in ("stop", "length") and meta["e2e_latency"] > 0


def test_hidden_states_on_request(engine, embedded_hf_model):
    """``return_hidden_states``: one final hidden state per output token, HF's at the position that produced it
    (prefill and decode steps alike); requests that did not ask get none."""
    import torch

    prompt = "The capital of France is"
    outs = engine.generate([prompt, prompt], [{"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}] * 2,
                           return_hidden_states=True)
    plain = engine.generate(prompt, {"max_new_tokens": 2, "temperature": 0})
    assert "hidden_states" not in plain["meta_info"]
    ids = engine.tokenizer(prompt).input_ids
    for out in outs:
        hidden = torch.tensor(out["meta_info"]["hidden_states"])  # [5, hidden]
        assert hidden.shape == (5, embedded_hf_model.config.hidden_size)
        seq = ids + out["output_ids"][:-1]
        with torch.no_grad():
            ref = embedded_hf_model(torch.tensor([seq]), output_hidden_states=True).hidden_states[-1][0]
        assert (hidden - ref[len(ids) - 1 :]).abs().max() < 1e-3


def test_an_internal_error_fails_its_request_not_the_engine(engine, monkeypatch):
    """A bug while delivering one request's output fails that request (with a message) and frees its KV; the
    engine keeps serving."""
    from radixlm.engine.request_state import RequestFailedError

    deliver = engine._apply
    broken = {"on": True}

    def failing(out):
        if broken["on"]:
            raise RuntimeError("a bug")
        deliver(out)

    monkeypatch.setattr(engine, "_apply", failing)
    with pytest.raises(RequestFailedError, match="internal error"):
        engine.generate("The capital of France is", {"max_new_tokens": 4, "temperature": 0})
    broken["on"] = False
    out = engine.generate("The capital of France is", {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True})
    assert out["meta_info"]["completion_tokens"] == 4


def test_batch_with_per_prompt_params_and_cached_tokens(engine):
    system = "You are a concise assistant. Reply in one short sentence. "
    prompts = [system + "What is water?", system + "What is fire?"]
    engine.generate(prompts[0], {"max_new_tokens": 2, "temperature": 0})
    outs = engine.generate(prompts, [{"max_new_tokens": 3, "temperature": 0, "ignore_eos": True},
                                     {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}])
    assert [o["meta_info"]["completion_tokens"] for o in outs] == [3, 5]
    assert all(o["meta_info"]["finish_reason"] == {"type": "length", "length": n} for o, n in zip(outs, (3, 5)))
    ids = [engine.tokenizer(p).input_ids for p in prompts]
    common = next(i for i, (a, b) in enumerate(zip(*ids)) if a != b)
    assert outs[0]["meta_info"]["cached_tokens"] == len(ids[0]) - 1  # whole prompt but the last token
    assert outs[1]["meta_info"]["cached_tokens"] == common


def test_stop_string_trimmed(engine):
    free = engine.generate("Count: 1, 2, 3, 4, 5, 6,", {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True})
    assert " 8" in free["text"], free["text"]
    stop = engine.generate("Count: 1, 2, 3, 4, 5, 6,", {"max_new_tokens": 16, "temperature": 0, "stop": [" 8"]})
    assert stop["meta_info"]["finish_reason"] == {"type": "stop", "matched": " 8"}
    assert stop["text"] == free["text"][: free["text"].index(" 8")]


def test_streaming_deltas_add_up(engine):
    full = engine.generate("Write a short poem about rain.", {"max_new_tokens": 24, "temperature": 0})
    chunks = list(engine.generate("Write a short poem about rain.", {"max_new_tokens": 24, "temperature": 0},
                                  stream=True))
    assert "".join(c["text"] for c in chunks) == full["text"]
    assert [t for c in chunks for t in c["output_ids"]] == full["output_ids"]
    assert chunks[-1]["meta_info"]["finish_reason"] is not None


def test_async_generate(engine):
    async def main():
        a, b = await asyncio.gather(
            engine.async_generate("Hello", {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}),
            engine.async_generate("World", {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}))
        return a, b
    a, b = asyncio.run(main())
    assert (a["meta_info"]["completion_tokens"], b["meta_info"]["completion_tokens"]) == (4, 6)


def test_bad_input_is_rejected_and_engine_survives(engine):
    with pytest.raises(ValueError, match="temperature"):
        engine.generate("Hi", {"temperature": -1})
    with pytest.raises(ValueError, match="unknown sampling parameter"):
        engine.generate("Hi", {"max_tokens_typo": 3})
    with pytest.raises(ValueError, match="context length"):
        engine.generate(input_ids=[5] * 9000)
    with pytest.raises(ValueError, match="stream=True"):  # refused before anything starts
        engine.generate(["Hi", "Yo"], {"max_new_tokens": 500, "ignore_eos": True}, stream=True)
    state = engine.control("get_state").payload
    assert state["num_running_reqs"] == state["num_waiting_reqs"] == 0
    assert engine.generate("Hi", {"max_new_tokens": 2, "temperature": 0})["meta_info"]["completion_tokens"] <= 2


def test_n_copies_share_the_prompt(engine):
    prompt = "List some fruits: apple, banana,"
    outs = engine.generate(prompt, {"max_new_tokens": 6, "temperature": 0.9, "seed": 7, "n": 3, "ignore_eos": True})
    assert len(outs) == 3
    prompt_len = len(engine.tokenizer(prompt).input_ids)
    # every copy found the prompt (all but its last token) in the radix cache
    assert all(o["meta_info"]["cached_tokens"] == prompt_len - 1 for o in outs)
    assert len({tuple(o["output_ids"]) for o in outs}) > 1  # seeds 7, 8, 9 sample differently
    again = engine.generate(prompt, {"max_new_tokens": 6, "temperature": 0.9, "seed": 7, "n": 3, "ignore_eos": True})
    assert [o["output_ids"] for o in again] == [o["output_ids"] for o in outs]  # seeded: reproducible


def test_logprobs_in_meta_info(engine):
    out = engine.generate("Paris is the capital of", {"max_new_tokens": 4, "temperature": 0},
                          return_logprob=True, logprob_start_len=0, top_logprobs_num=2)
    meta = out["meta_info"]
    assert [e[1] for e in meta["output_token_logprobs"]] == out["output_ids"]
    assert all(e[0] <= 0 and e[2] is None for e in meta["output_token_logprobs"])
    ids = engine.tokenizer("Paris is the capital of").input_ids
    assert [e[1] for e in meta["input_token_logprobs"]] == ids and meta["input_token_logprobs"][0][0] is None
    assert all(len(t) == 2 and t[0][1] == tok for t, tok in zip(meta["output_top_logprobs"], out["output_ids"]))
    with pytest.raises(ValueError, match="vocabulary"):
        engine.generate("x", return_logprob=True, token_ids_logprob=[10**9])


def test_abort_mid_generation(engine):
    chunks = engine.generate("Tell me a long story about a dragon.", {"max_new_tokens": 200, "ignore_eos": True},
                             stream=True)
    first = next(chunks)
    engine.abort(first["meta_info"]["id"])
    rest = list(chunks)
    assert rest[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    assert rest[-1]["meta_info"]["completion_tokens"] < 200
    assert engine.generate("Hi", {"max_new_tokens": 2, "temperature": 0})["meta_info"]["completion_tokens"] <= 2


def test_utf8_never_broken_in_stream(engine):
    # a prompt that invites emoji / non-Latin output; whatever comes out, no chunk may hold a broken character
    chunks = list(engine.generate("Reply with three emoji and the word 日本語: 🙂", {"max_new_tokens": 24,
                                                                                "temperature": 0}, stream=True))
    assert all("\ufffd" not in c["text"] for c in chunks)
    full = engine.generate("Reply with three emoji and the word 日本語: 🙂", {"max_new_tokens": 24, "temperature": 0})
    assert "".join(c["text"] for c in chunks) == full["text"]
    assert full["text"] == engine.tokenizer.decode(full["output_ids"], skip_special_tokens=True)


def test_skip_tokenizer_init_serves_token_ids(engine):
    """Without a tokenizer: ids in, the same ids out as with one, empty text; text-only features refused."""
    ids = engine.tokenizer("The capital of France is").input_ids
    want = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 6, "temperature": 0})["output_ids"]
    with radixlm.Engine(max_total_tokens=4096, random_seed=0, dtype="float32", skip_tokenizer_init=True) as bare:
        assert bare.tokenizer is None
        out = bare.generate(input_ids=ids, sampling_params={"max_new_tokens": 6, "temperature": 0})
        assert out["output_ids"] == want and out["text"] == ""
        with pytest.raises(ValueError, match="skip-tokenizer-init"):
            bare.generate("text needs a tokenizer", {"max_new_tokens": 2})
        with pytest.raises(ValueError, match="stop needs a tokenizer"):
            bare.generate(input_ids=ids, sampling_params={"max_new_tokens": 2, "stop": ["x"]})


def test_engine_in_a_script_without_main_guard_explains_itself(tmp_path):
    """A script that builds an Engine at module level: the spawned scheduler re-runs it, multiprocessing refuses
    to start a process from there, and the parent's exception carries that error and the fix."""
    script = tmp_path / "no_guard.py"
    script.write_text("import radixlm\n"
                      "radixlm.Engine(model_path='llama-3.2-1b', load_format='dummy', skip_tokenizer_init=True,\n"
                      "               max_total_tokens=64, random_seed=0)\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode != 0
    # The child's own output is forwarded to stderr as well; the parent's message is what follows its headline.
    headline = "RuntimeError: scheduler process (tp rank 0) exited with code 1 while loading the model."
    assert headline in run.stderr, run.stderr
    message = run.stderr[run.stderr.rindex(headline):]
    assert "if __name__ == '__main__':" in message.splitlines()[0]
    assert "current process has finished its bootstrapping phase" in message


def test_an_adapter_without_lora_enabled_is_refused(engine):
    from radixlm.errors import InvalidRequestError
    from radixlm.lora import LoRAAdapterError

    with pytest.raises(InvalidRequestError, match="LoRA adapter 'fr' requested, but this server serves no adapters"):
        engine.generate("Hi", {"max_new_tokens": 2}, lora_path="fr")
    with pytest.raises(LoRAAdapterError, match="need a server started with --enable-lora"):
        engine.load_lora_adapter("fr", "/nowhere")
    assert engine.generate("Hi", {"max_new_tokens": 2, "ignore_eos": True})["meta_info"]["completion_tokens"] == 2
