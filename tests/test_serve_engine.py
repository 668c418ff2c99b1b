"""The serving engine on the tiny chat model: every method's adapter answers exactly as a plain
greedy ``generate`` on that adapter alone, whatever else runs beside it; continuous batching
really batches; the adapter memory stays bounded; sampling, stop strings, budgets and the
refusals (busy, unknown model, too long, a broken adapter) behave as the contract says."""

from __future__ import annotations

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
