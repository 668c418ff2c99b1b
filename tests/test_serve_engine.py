"""The serving engine on the tiny chat model: every method's adapter answers exactly as a plain
greedy ``generate`` on that adapter alone, whatever else runs beside it; continuous batching
really batches; the adapter memory stays bounded; sampling, stop strings, budgets and the
refusals (busy, unknown model, too long, a broken adapter) behave as the contract says."""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest

from serve_helpers import chat_prompt, make_adapters, reference_ids, serving
from studio.serve.completion import Sampling
from studio.serve.engine import ServeEngine

GREEDY = Sampling(max_tokens=8, temperature=0)
METHODS = ["lora1", "lora2", "dora", "ia3", "prompt", "prefix", "bottleneck"]


@pytest.fixture(scope="module")
def adapters(tiny_chat_model, tmp_path_factory):
    return make_adapters(tiny_chat_model, tmp_path_factory.mktemp("serve-adapters"))


@pytest.fixture(scope="module")
def engine(tiny_chat_model, adapters):
    yield from serving(tiny_chat_model, adapters)


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
    assert len({tuple(references[n]) for n in ["tiny", *METHODS]}) >= 7


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
    # prompt-learning rows of different lengths in one batch (left padding beside virtual tokens)
    for name in ("prefix", "prompt"):
        for text in ("Hi", "Name three colours."):
            ids = chat_prompt(engine.tokenizer, text)
            refs[name + text] = reference_ids(tiny_chat_model, adapters[name], ids, 10)
            jobs.append((name + text, engine.submit(name, ids, Sampling(max_tokens=10, temperature=0))))
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
    # Lanes take turns: the first wave (mixed LoRA, IA3's own lane, prompt tuning's generate)
    # had all started before any of them finished.
    wave = [c for _, c in jobs[:4]]
    assert max(c.token_times[0] for c in wave) < min(c.token_times[-1] for c in wave)
    wait_for(lambda: engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0)


def test_a_seed_reproduces_a_sampled_answer_alone_and_beside_others(engine, prompt):
    seeded = Sampling(max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    alone = engine.submit("lora1", prompt, seeded)
    alone.text(timeout=60)
    crowd = [engine.submit(name, prompt, Sampling(max_tokens=10, temperature=1.0))
             for name in ("tiny", "lora2", "lora1")]
    beside = engine.submit("lora1", prompt, seeded)
    crowd.append(engine.submit("lora1", prompt, Sampling(max_tokens=10, temperature=1.0, seed=8)))
    for completion in [beside, *crowd]:
        completion.text(timeout=60)
    assert beside.token_ids == alone.token_ids
    assert crowd[-1].token_ids != alone.token_ids  # another seed, another draw: the seed matters


def test_a_stop_string_ends_the_answer_before_it_and_is_never_streamed(engine, prompt, references):
    full = engine.tokenizer.decode(references["lora2"], skip_special_tokens=True)
    stop = full[6:9]
    assert stop and full.index(stop) == 6
    completion = engine.submit("lora2", prompt, Sampling(max_tokens=8, temperature=0, stop=("zzzq", stop)))
    pieces = list(completion.deltas(timeout=60))
    assert "".join(pieces) == full[:6]
    assert completion.finish_reason == "stop"
    assert not any(stop in piece for piece in pieces)  # and the join above holds none of it
    budget = engine.submit("lora2", prompt, Sampling(max_tokens=3, temperature=0))
    budget.text(timeout=60)
    assert budget.finish_reason == "length" and budget.token_ids == references["lora2"][:3]


def test_refusals_name_the_problem_and_the_engine_keeps_serving(engine, adapters, prompt, references, tmp_path):
    from studio.compare.sources import AdapterSourceError
    from studio.serve.completion import AdapterLoadFailed, InvalidRequest, PromptTooLong, UnknownModel

    with pytest.raises(UnknownModel, match="'nope'") as unknown:
        engine.submit("nope", prompt, GREEDY)
    assert unknown.value.status == 404 and unknown.value.param == "model"
    with pytest.raises(PromptTooLong, match=r"context is 512 tokens; the prompt has \d+ and max_tokens asks 600"):
        engine.submit("tiny", prompt, Sampling(max_tokens=600))
    fits = 512 - len(prompt)  # fits the base exactly; not beside prompt tuning's 4 virtual tokens
    with pytest.raises(PromptTooLong, match=rf"the prompt has {len(prompt) + 4} \(with the adapter's 4 virtual"):
        engine.submit("prompt", prompt, Sampling(max_tokens=fits))
    engine.submit("tiny", prompt, Sampling(max_tokens=fits)).cancel()
    for ids, sampling, param in [([], GREEDY, "prompt"), ([1, 10**6], GREEDY, "prompt"),
                                 (prompt, Sampling(max_tokens=0), "max_tokens"),
                                 (prompt, Sampling(top_p=1.5), "top_p")]:
        with pytest.raises(InvalidRequest) as invalid:
            engine.submit("lora1", ids, sampling)
        assert invalid.value.status == 400 and invalid.value.param == param
    for bad in ["", "a/b", "x" * 65, "tiny"]:
        with pytest.raises(ValueError):
            engine.register(bad, adapters["lora1"])
    pickled = tmp_path / "pickled"
    shutil.copytree(adapters["lora1"], pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(AdapterSourceError, match="pickled"):
        engine.register("pickled", pickled)

    # A folder that passes the checks but does not fit the base fails its request, named.
    broken = tmp_path / "broken"
    shutil.copytree(adapters["lora1"], broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**config, "r": 16}))
    engine.register("broken", broken)
    with pytest.raises(AdapterLoadFailed, match="broken") as failed:
        engine.submit("broken", prompt, GREEDY).text(timeout=60)
    assert str(broken) in str(failed.value)
    assert not any(m.loaded for m in engine.models() if m.name == "broken")
    engine.unregister("broken")
    again = engine.submit("lora1", prompt, GREEDY)
    again.text(timeout=60)
    assert again.token_ids == references["lora1"]


def test_sampling_maths_and_streamed_text(engine):
    import torch

    from studio.serve.sampling import TextStream, top_p_probabilities

    # p = softmax(log [0.5, 0.3, 0.15, 0.05]) = the same; top_p 0.7 keeps the first two (0.5 < 0.7,
    # 0.8 >= 0.7), renormalised to 0.625 / 0.375; top_p 0 keeps the top token only.
    logits = torch.log(torch.tensor([0.05, 0.5, 0.15, 0.3]))
    q = top_p_probabilities(logits, 1.0, 0.7)
    assert torch.allclose(q, torch.tensor([0.0, 0.625, 0.0, 0.375]))
    assert torch.equal(top_p_probabilities(logits, 1.0, 0.0), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    # T = 0.5 squares the probabilities before normalising
    sharp = top_p_probabilities(logits, 0.5, 1.0)
    assert torch.allclose(sharp, torch.tensor([0.05, 0.5, 0.15, 0.3]) ** 2 / 0.365)

    tokenizer = engine.tokenizer  # the real SmolLM2 byte-level BPE: é and 🎉 span several tokens
    text = "Café 🎉 naïve — fin. END here"
    stream = TextStream(tokenizer, stops=("END",))
    pieces = []
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any(tokenizer.decode([t]).endswith("\ufffd") for t in ids)  # a character split over tokens
    for token in ids:
        piece, stopped = stream.add(token)
        pieces.append(piece)
        assert "\ufffd" not in piece
        if stopped:
            break
    assert stopped and "".join(pieces) == "Café 🎉 naïve — fin. "
    assert not any("E" in p for p in pieces)


def test_lru_keeps_at_most_max_active_adapters_attached(tiny_chat_model, adapters, prompt, references):
    """max_active=2 over 4 adapters (mixed and solo): all answer correctly, in turn and at once;
    never more than 2 attached; memory stays at base + 2 adapters; a full queue is Busy."""
    from studio.serve.completion import Busy

    names = ["lora1", "dora", "lora2", "prompt"]
    engine = ServeEngine.load(str(tiny_chat_model), "tiny", max_active=2)
    try:
        base_bytes = engine.stats()["resident_bytes"]
        adapter_bytes = max((adapters[n] / "adapter_model.safetensors").stat().st_size for n in names)
        for name in names:
            engine.register(name, adapters[name])
        seen, stop = [], threading.Event()

        def sample():
            while not stop.is_set():
                stats = engine.stats()
                seen.append((len(stats["active_adapters"]), stats["resident_bytes"]))
                time.sleep(0.001)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        for name in names + names[:2]:  # in turn: each first request loads, LRU detaches
            completion = engine.submit(name, prompt, GREEDY)
            completion.text(timeout=60)
            assert completion.token_ids == references[name], name
        together = [(n, engine.submit(n, prompt, GREEDY)) for n in names * 2]
        for name, completion in together:  # at once: requests wait for a free slot
            completion.text(timeout=60)
            assert completion.token_ids == references[name], name

        # Both slots busy with long answers: requests for a third adapter wait; a full queue is Busy.
        long = [engine.submit(n, prompt, Sampling(max_tokens=400, temperature=0)) for n in ("lora1", "lora2")]
        wait_for(lambda: all(c.token_ids for c in long))
        engine.max_waiting = 2
        waiting = [engine.submit("dora", prompt, GREEDY) for _ in range(2)]
        with pytest.raises(Busy, match="busy") as busy:
            engine.submit("dora", prompt, GREEDY)
        assert busy.value.status == 429
        assert engine.stats()["waiting"] == 2 and not any(c.token_ids for c in waiting)
        for completion in long:
            completion.cancel()
        for completion in waiting:
            completion.text(timeout=60)
            assert completion.token_ids == references["dora"]
        stop.set()
        sampler.join()
    finally:
        engine.close()
    assert max(n for n, _ in seen) == 2
    assert max(b for _, b in seen) <= base_bytes + 2 * adapter_bytes * 1.5
    assert all(c.finish_reason == "cancelled" for c in long)


def test_a_cache_the_loop_cannot_pad_falls_back_to_generate(tiny_chat_model, adapters, prompt, references,
                                                           monkeypatch, capfd):
    """A sliding-window or hybrid cache (here: declared so) is answered through generate lanes
    taking turns (LoRA rows batched by adapter_names, prompt learning one row at a time through
    PEFT's generate); every answer still exact."""
    from studio.serve import engine as engine_module

    monkeypatch.setattr(engine_module, "full_attention_cache", lambda model: False)
    engine = ServeEngine.load(str(tiny_chat_model), "tiny", max_active=8)
    try:
        assert "not plain full attention" in capfd.readouterr().err
        for name in ("lora1", "lora2", "ia3", "prompt", "prefix"):
            engine.register(name, adapters[name])
        jobs = [(n, engine.submit(n, prompt, GREEDY))
                for n in ("lora1", "lora2", "tiny", "ia3", "prompt", "prompt", "prefix")]
        for name, completion in jobs:
            completion.text(timeout=60)
            assert completion.token_ids == references[name], name
        assert engine.stats()["max_batch_seen"] >= 2
    finally:
        engine.close()


def test_unregister_waits_for_requests_and_an_adapter_brings_its_own_chat_template(
        engine, adapters, prompt, references, tmp_path):
    from studio.serve.completion import AdapterInUse, UnknownModel

    busy = engine.submit("lora2", prompt, Sampling(max_tokens=400, temperature=0))
    wait_for(lambda: busy.token_ids)
    with pytest.raises(AdapterInUse, match="lora2") as in_use:
        engine.unregister("lora2")
    assert in_use.value.status == 409
    busy.cancel()
    busy.text(timeout=60)
    wait_for(lambda: engine.stats()["running"] == 0)
    engine.unregister("lora2")
    assert "lora2" not in {m.name for m in engine.models()}
    with pytest.raises(UnknownModel):
        engine.submit("lora2", prompt, GREEDY)
    entry = engine.register("lora2", adapters["lora2"])  # back, loaded again on its next request
    assert entry.parent == "tiny" and entry.mixable and not entry.loaded
    again = engine.submit("lora2", prompt, GREEDY)
    again.text(timeout=60)
    assert again.token_ids == references["lora2"]

    # A client that saw its answer end may unregister at once, though the scheduler releases the
    # adapter a moment later (here held back 0.3 s after the step that ended the row).
    step = engine._mixed.step

    def slow_step():
        ended = step()
        if ended:
            time.sleep(0.3)
        return ended

    engine._mixed.step = slow_step
    try:
        last = engine.submit("lora2", prompt, Sampling(max_tokens=2, temperature=0))
        last.text(timeout=60)
        engine.unregister("lora2")
    finally:
        del engine._mixed.step
    engine.register("lora2", adapters["lora2"])

    # A folder that saved its tokenizer brings its chat template; the others use the base's.
    own = tmp_path / "own-template"
    shutil.copytree(adapters["lora1"], own)
    engine.tokenizer.save_pretrained(own)
    config = json.loads((own / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    (own / "tokenizer_config.json").write_text(json.dumps(config))
    (own / "chat_template.jinja").unlink(missing_ok=True)
    engine.register("own", own)
    rendered = engine.tokenizer_for("own").apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered == "<<hi>>"
    assert engine.tokenizer_for("lora1") is engine.tokenizer_for("tiny") is engine.tokenizer
    with pytest.raises(UnknownModel):
        engine.tokenizer_for("nope")


@pytest.mark.parametrize("loop", ["decode", "generate"])
def test_ignore_eos_answers_to_max_tokens_beside_rows_that_stop(tiny_chat_model, adapters, prompt, references,
                                                               tmp_path, monkeypatch, loop):
    """vLLM's ``ignore_eos``: a row asking it takes the end-of-sequence token as any other and runs
    to its budget, while the row beside it in the same batch still stops there. The base here
    declares its greedy answer's third token an end-of-sequence token, so that it ends early."""
    from studio.serve import engine as engine_module

    if loop == "generate":
        monkeypatch.setattr(engine_module, "full_attention_cache", lambda model: False)
    model = tmp_path / "eos-model"
    shutil.copytree(tiny_chat_model, model)
    answer = references["tiny"]
    assert len(answer) == GREEDY.max_tokens and answer[2] not in answer[:2]
    config = json.loads((model / "generation_config.json").read_text())
    config["eos_token_id"] = [config["eos_token_id"], answer[2]]
    (model / "generation_config.json").write_text(json.dumps(config))
    engine = ServeEngine.load(str(model), "tiny", max_active=2)
    try:
        engine.register("lora1", adapters["lora1"])
        stops, runs = (engine.submit("tiny", prompt, GREEDY),
                       engine.submit("tiny", prompt, Sampling(max_tokens=8, temperature=0, ignore_eos=True)))
        beside = engine.submit("lora1", prompt, GREEDY)
        for completion in (stops, runs, beside):
            completion.text(timeout=60)
        assert (stops.token_ids, stops.finish_reason) == (answer[:2], "stop")
        assert (runs.token_ids, runs.finish_reason) == (answer, "length")
        assert beside.token_ids == references["lora1"][:references["lora1"].index(answer[2])] \
            if answer[2] in references["lora1"] else references["lora1"]
    finally:
        engine.close()
