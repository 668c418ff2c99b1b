"""The Compare engine on a real (tiny, random) model: batched columns equal single-adapter answers
token for token, mixed methods each equal their own model, and the base is loaded once."""

from __future__ import annotations

import pytest
import torch

from chat_helpers import save_bottleneck_adapter, save_peft_adapter
from studio.compare.engine import BASE, ChatEngine, share_base
from studio.compare.settings import GenerationSettings
from studio.compare.sources import AdapterSourceError, detect_method
from studio.evaluate import generate_answers
from studio.models import load_config, load_model, load_tokenizer

GREEDY = GenerationSettings(max_new_tokens=10)
MESSAGE = "Name three colours."


@pytest.fixture(scope="module")
def adapter_dirs(tiny_chat_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    dirs = {f"lora{i}": save_peft_adapter(tiny_chat_model, root / f"lora{i}", "lora", seed=i) for i in (1, 2, 3)}
    for seed, method in enumerate(["dora", "ia3", "prompt", "prefix"], start=10):
        dirs[method] = save_peft_adapter(tiny_chat_model, root / method, method, seed=seed)
    dirs["bottleneck"] = save_bottleneck_adapter(tiny_chat_model, root / "bottleneck", seed=20)
    return dirs


def single_answer(model_dir, folder=None) -> str:
    """The reference: a freshly loaded base with only this adapter, through studio.evaluate."""
    from peft import PeftModel

    from studio.adapters import bottleneck

    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir))
    if folder is not None:
        model = (bottleneck.load_bottleneck(model, folder) if bottleneck.is_bottleneck_folder(folder)
                 else PeftModel.from_pretrained(model, str(folder)))
    return generate_answers(model.eval(), tokenizer, [MESSAGE], max_new_tokens=GREEDY.max_new_tokens)[0]


def ask(engine, columns):
    return engine.answer({c: [{"role": "user", "content": MESSAGE}] for c in columns}, GREEDY)


def test_three_lora_columns_batched_equal_their_single_adapter_answers(tiny_chat_model, adapter_dirs):
    engine = ChatEngine.load(str(tiny_chat_model))
    for name in ("lora1", "lora2", "lora3"):
        engine.add_adapter(name, adapter_dirs[name])
    columns = [BASE, "lora1", "lora2", "lora3"]
    answers = ask(engine, columns)
    assert {engine.path(c) for c in columns} == {"batched"}
    assert all(answers[c].path == "batched" for c in columns)
    assert answers[BASE].text == single_answer(tiny_chat_model)
    for name in ("lora1", "lora2", "lora3"):
        assert answers[name].text == single_answer(tiny_chat_model, adapter_dirs[name]), name
    assert len({a.text for a in answers.values()}) >= 3  # the adapters really change the answer
    assert all(a.tokens > 0 and a.seconds > 0 for a in answers.values())

    # A column toggled off is not answered; the others answer exactly as before.
    fewer = ask(engine, [BASE, "lora2"])
    assert set(fewer) == {BASE, "lora2"}
    assert fewer["lora2"].text == answers["lora2"].text

    # The base column equals the adapter model with its adapters disabled.
    with engine._lora_view.disable_adapter():
        disabled = generate_answers(engine._lora_view, engine.tokenizer, [MESSAGE], max_new_tokens=10)[0]
    assert answers[BASE].text == disabled


def test_mixed_methods_each_column_equals_its_single_adapter(tiny_chat_model, adapter_dirs):
    engine = ChatEngine.load(str(tiny_chat_model))
    names = ["lora1", "dora", "ia3", "prompt", "prefix", "bottleneck"]
    for name in names:
        engine.add_adapter(name, adapter_dirs[name])
    answers = ask(engine, [BASE, *names])
    assert answers["lora1"].path == "batched" and answers[BASE].path == "batched"
    assert all(answers[n].path == "switched" for n in names[1:])
    for name in names:
        assert answers[name].text == single_answer(tiny_chat_model, adapter_dirs[name]), name
    assert answers[BASE].text == single_answer(tiny_chat_model)
    assert len({a.text for a in answers.values()}) >= 5


def test_base_weights_are_loaded_once_and_shared(tiny_chat_model, adapter_dirs):
    engine = ChatEngine.load(str(tiny_chat_model))
    base_params = dict(engine.base.named_parameters())
    before = engine.resident_bytes()
    for name in ("lora1", "ia3", "prompt", "bottleneck"):
        engine.add_adapter(name, adapter_dirs[name])
    # Every view's copy of a base weight is the base's tensor object itself.
    for view in engine.models()[1:]:
        for name, param in view.named_parameters():
            short = name.split("base_model.model.")[-1].replace(".base_layer", "").replace(".base.", ".")
            if short in base_params:
                assert param is base_params[short], name
    # The base model itself was never wrapped: no adapter module inside it.
    assert not any("lora" in n or "ia3" in n or "adapter" in n for n, _ in engine.base.named_modules())
    adapter_bytes = sum(p.numel() * p.element_size() for v in engine.models()[1:]
                        for n, p in v.named_parameters() if n.split("base_model.model.")[-1] not in base_params
                        and ".base_layer." not in n and ".base." not in n)
    grown = engine.resident_bytes() - before
    assert 0 < grown <= adapter_bytes * 1.01 + 4096
    assert grown < before / 10  # nowhere near a second copy of the base


def test_share_base_keeps_ties_and_does_not_copy():
    from transformers import AutoModelForCausalLM

    from conftest import tiny_llama_config

    model = AutoModelForCausalLM.from_config(tiny_llama_config(tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    view = share_base(model)
    assert view is not model and view.model.layers[0] is not model.model.layers[0]
    assert view.model.layers[0].self_attn.q_proj.weight is model.model.layers[0].self_attn.q_proj.weight
    assert view.lm_head.weight is view.model.embed_tokens.weight


def test_removed_and_bad_adapters(tiny_chat_model, adapter_dirs, tmp_path):
    engine = ChatEngine.load(str(tiny_chat_model))
    engine.add_adapter("lora1", adapter_dirs["lora1"])
    engine.add_adapter("run 3.lora @ step 2", adapter_dirs["lora2"])  # any text is a column name
    assert ask(engine, ["run 3.lora @ step 2"])["run 3.lora @ step 2"].path == "batched"
    engine.remove_adapter("run 3.lora @ step 2")
    with pytest.raises(ValueError, match="already attached"):
        engine.add_adapter("lora1", adapter_dirs["lora2"])
    engine.remove_adapter("lora1")
    assert engine.adapters == {} and engine._lora_view is None
    with pytest.raises(AdapterSourceError, match="not an adapter folder"):
        engine.add_adapter("x", tmp_path)
    with pytest.raises(AdapterSourceError, match="whole model"):
        detect_method(tiny_chat_model)
    with pytest.raises(KeyError, match="nope"):
        engine.answer({"nope": [{"role": "user", "content": "hi"}]}, GREEDY)


def test_detect_method_names_each_kind(adapter_dirs):
    from studio.adapters import bottleneck
    from studio.compare.sources import BOTTLENECK_CONFIG

    assert BOTTLENECK_CONFIG == bottleneck.CONFIG_NAME
    assert [detect_method(adapter_dirs[n]) for n in ("lora1", "dora", "ia3", "prompt", "prefix", "bottleneck")] \
        == ["lora", "dora", "ia3", "prompt", "prefix", "houlsby"]


def test_stream_yields_partials_then_answers_and_stop_ends_early(tiny_chat_model, adapter_dirs):
    engine = ChatEngine.load(str(tiny_chat_model))
    engine.add_adapter("lora1", adapter_dirs["lora1"])
    conversations = {c: [{"role": "user", "content": MESSAGE}] for c in (BASE, "lora1")}
    frames = list(engine.stream(conversations, GenerationSettings(max_new_tokens=24)))
    assert frames[-1][1] is not None and all(f[1] is None for f in frames[:-1])
    assert len(frames) > 2  # tokens arrived while generating
    final = frames[-1][1]
    assert frames[-1][0] == {c: a.text for c, a in final.items()}

    seen = []
    for partial, done in engine.stream(conversations, GenerationSettings(max_new_tokens=200)):
        seen.append(partial)
        if done is None and len(seen) == 2:
            engine.request_stop()
        if done is not None:
            assert all(a.stopped for a in done.values())
            assert max(a.tokens for a in done.values()) < 200


def test_sampling_is_reproducible_with_a_seed(tiny_chat_model):
    engine = ChatEngine.load(str(tiny_chat_model))
    conversation = {BASE: [{"role": "user", "content": MESSAGE}]}
    settings = GenerationSettings(sample=True, temperature=1.0, top_p=1.0, max_new_tokens=12, seed=7)
    first = engine.answer(conversation, settings)[BASE].text
    assert engine.answer(conversation, settings)[BASE].text == first
    with pytest.raises(ValueError, match="temperature"):
        engine.answer(conversation, GenerationSettings(sample=True, temperature=0))
    torch.manual_seed(0)


def test_eval_set_scores_each_column_with_its_own_adapter(tiny_chat_model, adapter_dirs):
    from peft import PeftModel

    from studio.evaluate import score_task

    engine = ChatEngine.load(str(tiny_chat_model))
    engine.add_adapter("lora1", adapter_dirs["lora1"])
    engine.add_adapter("ia3", adapter_dirs["ia3"])
    engine.add_adapter("prefix", adapter_dirs["prefix"])  # left-padded batches through a prompt-learning view
    results = engine.score([BASE, "lora1", "ia3", "prefix"], "sentiment", limit=4)
    assert set(results) == {BASE, "lora1", "ia3", "prefix"} and all(r.examples == 4 for r in results.values())
    single = PeftModel.from_pretrained(load_model(str(tiny_chat_model)), str(adapter_dirs["ia3"])).eval()
    assert results["ia3"].predictions == score_task(single, engine.tokenizer, "sentiment", limit=4).predictions
    assert results["lora1"].predictions != results[BASE].predictions


def test_eval_set_can_be_an_imported_dataset(tiny_chat_model, adapter_dirs, tmp_path):
    import json

    from peft import PeftModel

    from studio import projects
    from studio.data import import_dataset
    from studio.db import Database
    from studio.data import load_dataset_split
    from studio.evaluate import eval_examples, score_dataset
    from studio.ui.compare_view import eval_scores

    db = Database()
    project = projects.create_project(db, "compare eval")
    chat_file, text_file = tmp_path / "qa.jsonl", tmp_path / "notes.txt"
    chat_file.write_text("\n".join(json.dumps({"prompt": f"question {i}", "completion": f"answer {i}"})
                                   for i in range(20)))
    text_file.write_text("\n".join(f"a line of plain text {i}" for i in range(20)))
    chat_set = import_dataset(db, project, chat_file, eval_ratio=0.25).dataset
    text_set = import_dataset(db, project, text_file, eval_ratio=0.25).dataset

    engine = ChatEngine.load(str(tiny_chat_model))
    engine.add_adapter("lora1", adapter_dirs["lora1"])
    table, answers = eval_scores(engine, db, [BASE, "lora1"], f"dataset:{chat_set.id}", 3)
    assert list(table["examples"]) == [3, 3] and list(table["method"]) == ["base", "lora"]
    # Each column's figure is that model's own score on the same rows.
    rows = load_dataset_split(db, chat_set.id, "eval")
    single = PeftModel.from_pretrained(load_model(str(tiny_chat_model)), str(adapter_dirs["lora1"])).eval()
    expected = score_dataset(single, engine.tokenizer, rows, limit=3)
    assert table.iloc[1]["correct"] == expected.correct and table.iloc[1]["exact match"] == f"{expected.exact_match:.0%}"
    answered = engine.score_examples([BASE, "lora1"], eval_examples(rows, engine.tokenizer, 3))
    assert answered["lora1"].predictions == expected.predictions != answered[BASE].predictions
    # Row by row (issue 15 item 10: only percentages were shown): prompt, expected, each answer.
    assert list(answers.columns) == ["prompt", "expected", "Base model", "lora1"] and len(answers) == 3
    assert answers["expected"].str.startswith("answer ").all()
    assert all(a[2:42] == " ".join(p.split())[:40] for a, p in zip(answers["lora1"], expected.predictions))
    assert sum(a.startswith("✓") for a in answers["lora1"]) == expected.correct

    assert "plain-text dataset" in eval_scores(engine, db, [BASE], f"dataset:{text_set.id}", 3)[0].iloc[0]["note"]
    assert "no longer exists" in eval_scores(engine, db, [BASE], "dataset:999", 3)[0].iloc[0]["note"]
    sample_table, sample_answers = eval_scores(engine, db, [BASE], "sample:sentiment", 2)
    assert list(sample_table["examples"]) == [2] and len(sample_answers) == 2
    db.close()


def test_chat_is_refused_when_it_would_not_fit_beside_a_training_run():
    from conftest import CONFIGS
    from studio.arch import ArchInfo
    from studio.compare.sources import chat_fits_beside_training
    from studio.estimate import TrainSetup, estimate_chat, estimate_training
    from studio.methods import get_method

    arch = ArchInfo.from_config(load_config(str(CONFIGS / "llama3-8b.json")))
    setup = TrainSetup(batch_size=4, seq_len=1024, dtype="bf16", device="cuda")
    lora = get_method("lora")
    params = lora.params({})
    training = estimate_training(arch, "lora", params, lora.count(arch, params).trainable, setup).total_bytes
    chat = estimate_chat(arch, setup, context=2048, batch=7).total_bytes
    gib = 2**30
    assert chat_fits_beside_training(chat, 0, 24 * gib) is None  # an 8B chat alone fits a 24 GiB card
    reason = chat_fits_beside_training(chat, training, 24 * gib)
    assert reason is not None and "running training" in reason and "GiB" in reason
    enough = int((chat + training) / 0.9) + 1
    assert chat_fits_beside_training(chat, training, enough) is None
    assert chat_fits_beside_training(chat, training, enough - 2**20) is not None
