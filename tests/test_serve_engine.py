"""The serving engine on the tiny chat model: every method's adapter answers exactly as a plain
greedy ``generate`` on that adapter alone, whatever else runs beside it; continuous batching
really batches; the adapter memory stays bounded; sampling, stop strings, budgets and the
refusals (busy, unknown model, too long, a broken adapter) behave as the contract says."""

from __future__ import annotations

import time

import pytest

from serve_helpers import chat_prompt, make_adapters, reference_ids
from studio.serve.engine import Sampling, ServeEngine

GREEDY = Sampling(max_tokens=8, temperature=0)
METHODS = ["lora1", "lora2", "dora", "ia3", "prompt", "prefix", "bottleneck"]


@pytest.fixture(scope="module")
def adapters(tiny_chat_model, tmp_path_factory):
    return make_adapters(tiny_chat_model, tmp_path_factory.mktemp("serve-adapters"))


@pytest.fixture(scope="module")
def engine(tiny_chat_model, adapters):
    engine = ServeEngine.load(str(tiny_chat_model), "tiny", max_active=8)
    for name, folder in adapters.items():
        engine.register(name, folder)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def prompt(engine):
    return chat_prompt(engine.tokenizer, "Name three colours.")


@pytest.fixture(scope="module")
def references(tiny_chat_model, adapters, prompt):
    """Each model's single-request greedy answer (computed once, reused by every test)."""
    refs = {"tiny": reference_ids(tiny_chat_model, None, prompt, GREEDY.max_tokens)}
    for name in METHODS:
        refs[name] = reference_ids(tiny_chat_model, adapters[name], prompt, GREEDY.max_tokens)
    return refs


def test_each_method_answers_as_generate_on_that_adapter_alone(engine, prompt, references):
    for name in ["tiny", *METHODS]:
        completion = engine.submit(name, prompt, GREEDY)
        text = completion.text(timeout=60)
        assert completion.token_ids == references[name], name
        assert completion.finish_reason in ("length", "stop")
        assert completion.prompt_tokens == len(prompt)
        assert text == engine.tokenizer.decode(references[name], skip_special_tokens=True), name
    # the adapters really change the answer (else equality above could not fail)
    assert len({tuple(references[n]) for n in ["tiny", "lora1", "lora2", "dora", "ia3", "prompt"]}) >= 5


def wait_for(condition, seconds=30.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def test_concurrent_requests_join_the_running_batch_and_equal_their_single_answers(
        engine, tiny_chat_model, adapters, prompt):
    names = ["lora1", "lora2", "ia3", "prompt"]
    prompts = {n: chat_prompt(engine.tokenizer, text) for n, text in
               zip(names, ["Hi", "Name three colours.", "Count to five", "What is the capital of France?"])}
    refs = {n: reference_ids(tiny_chat_model, adapters[n], prompts[n], 10) for n in names}
    long_ref = reference_ids(tiny_chat_model, adapters["lora1"], prompt, 30)

    # A long LoRA answer runs; once it has 5 tokens, the others arrive, some mid-flight.
    first = engine.submit("lora1", prompt, Sampling(max_tokens=30, temperature=0))
    wait_for(lambda: len(first.token_ids) >= 5)
    jobs = []
    for i in range(8):
        name = names[i % 4]
        jobs.append((name, engine.submit(name, prompts[name], Sampling(max_tokens=10, temperature=0))))
        if i == 3:
            time.sleep(0.01)
    victim = engine.submit("lora2", prompt, Sampling(max_tokens=10, temperature=0))
    pieces = victim.deltas(timeout=30)
    next(pieces)  # it is decoding
    victim.cancel()
    list(pieces)  # the stream ends (no error) once the cancel is seen
    for name, completion in jobs:
        completion.text(timeout=60)
        assert completion.token_ids == refs[name], name
    assert first.text(timeout=60) and first.token_ids == long_ref
    assert victim.finish_reason == "cancelled" and len(victim.token_ids) < 10

    # The mixed lane really batched: a LoRA row started after the long row's 5th token, and the
    # long row went on decoding after it (both in one batch, none waiting for the other).
    joined = [c for n, c in jobs if n in ("lora1", "lora2")]
    assert any(c.token_times[0] > first.token_times[4] and first.token_times[-1] > c.token_times[0]
               for c in joined)
    assert engine.stats()["max_batch_seen"] >= 2
    wait_for(lambda: engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0)
