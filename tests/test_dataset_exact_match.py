"""Exact match for runs and bake-offs on an imported dataset (not a sample task), trained in
this process with the worker's own ``train.train`` (a bake-off run measures its saved adapter
there too, as its worker process would).

The tiny random chat model is fully fine-tuned on a chat dataset whose every answer is "yes"
until it answers "yes" and stops; the recorded ``eval_exact_match`` must be the score of the
saved model on the dataset's eval rows, recomputed here independently (``generate_answers`` on
the questions, whitespace-normalised comparison), and 3 of 4 (the "no" row stays a miss), so
that it is not a 0 that any broken scorer would also give. A plain-text dataset records no
exact match and says why: in the run's output, and as a note in the bake-off table.
"""

from __future__ import annotations

import json
from dataclasses import replace

from studio.data import import_dataset, load_dataset_split
from studio.db import Database
from studio.evaluate import eval_examples, generate_answers, normalise_answer
from studio.projects import create_project
from studio.runspec import RunSpec
from studio.runs import launch
from studio.worker import train
from worker_helpers import explain, folder_of, metrics, tiny_spec, train_here

PROJECT = "worker tests"  # the project worker_helpers.new_run puts runs in
QUESTIONS = [f"Is {n} a number?" for n in range(40)]
EVAL = [("Is ten a number?", "yes"), ("Is blue a number?", "yes"), ("Is 7 a word?", "yes"),
        ("Is the sky green?", "no")]
EXPECTED = 3 / 4
# Full fine-tuning at a constant 2e-2 takes the loss from 10.6 to < 0.001 in 24 steps (~20 s):
# the model says "yes" and then its end-of-turn token. LoRA on this 64-wide model barely moves.
LEARN = dict(method="full", max_steps=24, learning_rate=2e-2, lr_scheduler="constant", warmup_ratio=0.0)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def project_id(db: Database) -> int:
    return (db.get_project_by_name(PROJECT) or create_project(db, PROJECT)).id


def yes_dataset(db: Database, tmp_path) -> int:
    train_file = write_jsonl(tmp_path / "train.jsonl", [chat(q, "yes") for q in QUESTIONS])
    eval_file = write_jsonl(tmp_path / "eval.jsonl", [chat(q, a) for q, a in EVAL])
    return import_dataset(db, project_id(db), train_file, eval_source=eval_file, format="messages").dataset.id


def prose_dataset(db: Database, tmp_path) -> int:
    text = tmp_path / "prose.txt"
    text.write_text("".join(f"Sentence {i} of a story about the sea.\n" for i in range(40)), encoding="utf-8")
    return import_dataset(db, project_id(db), str(text), eval_ratio=0.2).dataset.id


def recomputed(db: Database, run, dataset_id: int, model_dir) -> float:
    """Exact match of the run's saved model on the eval questions, without the scorer under test."""
    from studio.export.load import load_trained
    from studio.models import load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    model = load_trained(RunSpec.from_dict(run.spec), folder_of(db, run.id) / "adapter").eval()
    budget = eval_examples(load_dataset_split(db, dataset_id, "eval"), tokenizer).answer_budget
    answers = generate_answers(model, tokenizer, [q for q, _ in EVAL], max_new_tokens=budget)
    hits = [normalise_answer(p) == a for p, (_, a) in zip(answers, EVAL)]
    assert hits == [True, True, True, False], answers
    return sum(hits) / len(EVAL)


def test_a_run_on_an_imported_chat_dataset_records_its_exact_match(db, tiny_chat_model, tmp_path):
    dataset_id = yes_dataset(db, tmp_path)
    run = train_here(db, tiny_spec(tiny_chat_model, sample_task=None, dataset_id=dataset_id,
                                   exact_match_limit=len(EVAL), **LEARN))
    assert run.status == "completed", explain(db, run)
    recorded = metrics(db, run.id)["eval_exact_match"]
    assert set(recorded) == {LEARN["max_steps"]}
    assert recorded[LEARN["max_steps"]] == recomputed(db, run, dataset_id, tiny_chat_model) == EXPECTED


def test_a_plain_text_dataset_records_no_exact_match_and_says_why(db, tiny_chat_model, tmp_path, capsys):
    dataset_id = prose_dataset(db, tmp_path)
    run = train_here(db, tiny_spec(tiny_chat_model, sample_task=None, dataset_id=dataset_id, max_steps=2,
                                   exact_match_limit=4))
    assert run.status == "completed", explain(db, run)
    m = metrics(db, run.id)
    assert "eval_loss" in m and "eval_exact_match" not in m
    assert "exact match not measured: a plain-text dataset has no answers to match" in capsys.readouterr().out


def bakeoff_run(db: Database, model_dir, dataset_id: int, **overrides):
    """A one-method bake-off on the dataset, its run trained (and measured) in this process."""
    from studio.bakeoff import Budget
    from studio.bakeoff.core import method_spec

    budget = Budget(max_steps=2, batch_size=4, max_length=64, eval_rows=len(EVAL))
    spec = replace(method_spec(str(model_dir), overrides.get("method", "lora"), budget, dataset_id=dataset_id),
                   **overrides)
    run = launch.create_run(db, project_id(db), spec.validate(), f"bake-off: {spec.method}")
    row = db.create_bakeoff(project_id(db), "dataset bake-off", str(model_dir), [spec.method], budget.to_dict(),
                            [run.id], dataset_id=dataset_id)
    assert train.train(db, run.id) == "completed", explain(db, db.get_run(run.id))
    return db.get_run(run.id), row


def test_a_bakeoff_on_an_imported_chat_dataset_fills_eval_exact_match(db, tiny_chat_model, tmp_path):
    from studio.bakeoff.table import quality_label, refresh, to_csv

    dataset_id = yes_dataset(db, tmp_path)
    run, row = bakeoff_run(db, tiny_chat_model, dataset_id, **LEARN)
    [line] = refresh(db, row.id)
    assert line["exact_match"] == recomputed(db, run, dataset_id, tiny_chat_model) == EXPECTED, line
    assert line["note"] == "" and quality_label([line]) == "eval exact match"
    assert "0.75" in to_csv([line])
    # Measured once, on the saved model (a bake-off run skips the training model's scoring).
    assert set(metrics(db, run.id)["eval_exact_match"]) == {LEARN["max_steps"]}


def test_a_bakeoff_on_a_plain_text_dataset_notes_why_exact_match_is_empty(db, tiny_chat_model, tmp_path):
    from studio.bakeoff.table import quality_label, refresh

    dataset_id = prose_dataset(db, tmp_path)
    run, row = bakeoff_run(db, tiny_chat_model, dataset_id)
    [line] = refresh(db, row.id)
    assert line["exact_match"] is None and line["infer_tokens_per_s"] > 0
    assert line["note"] == "no exact match: a plain-text dataset has no answers to match"
    assert quality_label([line]) == "minus eval loss"
