"""Exact match on an imported dataset's eval rows (``studio.evaluate.score_dataset``), on the tiny
random chat model. The expected answers are computed independently here with
``generate_answers`` (single user messages, the same batching), and the references are built
from them, so a row is correct exactly when the scorer should say so."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset

from studio.data import import_dataset, load_dataset_split
from studio.evaluate import (ANSWER_MARGIN_TOKENS, MAX_ANSWER_TOKENS, eval_examples, generate_answers,
                             normalise_answer, score_dataset)
from studio.projects import create_project

QUESTIONS = ["What is 2 + 2?", "Say hello.", "Name a colour.", "Spell cat.", "Count to three."]
BUDGET = 10  # max_new_tokens for the hand-made references: the random model never stops early


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_chat_model):
    from studio.models import load_model, load_tokenizer

    return load_model(str(tiny_chat_model)).eval(), load_tokenizer(str(tiny_chat_model))


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def import_chat(db, tmp_path, eval_rows, name="chat"):
    """A chat dataset imported from JSONL, with ``eval_rows`` as its eval split."""
    project = db.get_project_by_name("eval") or create_project(db, "eval")
    train = write_jsonl(tmp_path / f"{name}-train.jsonl", [chat(("user", "hi"), ("assistant", "hello"))] * 4)
    evaluation = write_jsonl(tmp_path / f"{name}-eval.jsonl", eval_rows)
    result = import_dataset(db, project, train, eval_source=evaluation, format="messages")
    return load_dataset_split(db, result.dataset.id, "eval")


def test_a_row_counts_exactly_when_the_greedy_answer_matches_after_normalisation(
        db, tmp_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    answers = generate_answers(model, tokenizer, QUESTIONS, max_new_tokens=BUDGET)
    assert all(a.strip() for a in answers) and len(set(answers)) > 1
    references = [
        answers[0],  # verbatim
        "  " + answers[1].replace(" ", " \n\t ") + "\n",  # other whitespace only: still a hit
        answers[2] + ".",  # one character more: a miss
        answers[2],  # another row's answer: a miss
        answers[4].upper() if answers[4].upper() != answers[4] else answers[4] + "x",  # case matters
    ]
    rows = import_chat(db, tmp_path, [chat(("user", q), ("assistant", r)) for q, r in zip(QUESTIONS, references)])
    assert [r["messages"][-1]["content"] for r in rows] == references  # imported verbatim

    score = score_dataset(model, tokenizer, rows, max_new_tokens=BUDGET)
    assert score.predictions == answers  # the same prompts, batching and greedy decoding
    expected = [normalise_answer(a) == normalise_answer(r) for a, r in zip(answers, references)]
    assert expected == [True, True, False, answers[3] == answers[2], False]
    assert (score.examples, score.correct, score.skipped) == (5, sum(expected), 0)
    assert score.exact_match == pytest.approx(sum(expected) / 5)
    assert score.seconds > 0

    limited = score_dataset(model, tokenizer, rows, limit=2, max_new_tokens=BUDGET)
    assert (limited.examples, limited.correct) == (2, 2)


def test_normalisation_forgives_whitespace_only():
    assert normalise_answer("  The  answer\n is\t42 \n") == "The answer is 42"
    assert normalise_answer("a\u00a0b") == "a b"  # Unicode whitespace too
    assert normalise_answer("Yes.") != normalise_answer("yes")


def test_system_and_earlier_turns_are_part_of_the_prompt(db, tmp_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    system = "You answer in one word."
    answer = generate_answers(model, tokenizer, [QUESTIONS[0]], max_new_tokens=BUDGET, system_prompt=system)[0]
    without_system = generate_answers(model, tokenizer, [QUESTIONS[0]], max_new_tokens=BUDGET)[0]
    assert answer != without_system  # otherwise the test could not tell
    rows = import_chat(db, tmp_path, [chat(("system", system), ("user", QUESTIONS[0]), ("assistant", answer))])
    score = score_dataset(model, tokenizer, rows, max_new_tokens=BUDGET)
    assert (score.examples, score.correct, score.predictions) == (1, 1, [answer])

    # A multi-turn row: the prompt is every message before the last assistant turn.
    import torch

    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
               {"role": "user", "content": QUESTIONS[1]}]
    text = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    batch = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=BUDGET, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    score = score_dataset(model, tokenizer, [{"messages": [*history, {"role": "assistant", "content": expected}]}],
                          max_new_tokens=BUDGET)
    assert (score.examples, score.correct, score.predictions) == (1, 1, [expected])


def test_rows_without_a_final_assistant_answer_are_skipped_and_counted(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    answers = generate_answers(model, tokenizer, QUESTIONS[:2], max_new_tokens=BUDGET)
    rows = Dataset.from_list([
        chat(("user", QUESTIONS[0]), ("assistant", answers[0])),
        chat(("user", QUESTIONS[0]), ("assistant", answers[0]), ("user", "and then?")),  # ends with the user
        chat(("assistant", "an answer to nothing")),  # no prompt
        chat(("user", QUESTIONS[1]), ("assistant", answers[1])),
    ])
    score = score_dataset(model, tokenizer, rows, max_new_tokens=BUDGET)
    assert (score.examples, score.correct, score.skipped) == (2, 2, 2)
    assert score.predictions == answers

    nothing = [chat(("user", "a"), ("assistant", "b"), ("user", "c"))]
    assert score_dataset(model, tokenizer, nothing) is None
    assert "assistant" in eval_examples(nothing, tokenizer).reason


def test_the_answer_budget_covers_the_longest_reference_and_is_capped(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    short, longer = "yes", "one two three four five six seven"
    examples = eval_examples([chat(("user", "q"), ("assistant", short)), chat(("user", "q"), ("assistant", longer))],
                             tokenizer)
    tokens = len(tokenizer(longer, add_special_tokens=False)["input_ids"])
    assert examples.longest_reference_tokens == tokens
    assert examples.answer_budget == tokens + ANSWER_MARGIN_TOKENS

    # A reference that no answer within the cap could match is skipped, not scored as a miss.
    too_long = " ".join(["word"] * MAX_ANSWER_TOKENS)
    examples = eval_examples([chat(("user", "q"), ("assistant", too_long)), chat(("user", "q"), ("assistant", short))],
                             tokenizer)
    assert examples.references == [short] and examples.skipped == 1
    assert examples.answer_budget <= MAX_ANSWER_TOKENS

    # Without an explicit budget the answers are generated with the computed one (the random
    # model never stops early, so every answer is exactly that long).
    score = score_dataset(model, tokenizer, [chat(("user", "q"), ("assistant", short))])
    generated = len(tokenizer(score.predictions[0], add_special_tokens=False)["input_ids"])
    assert abs(generated - (len(tokenizer(short, add_special_tokens=False)["input_ids"]) + ANSWER_MARGIN_TOKENS)) <= 3


def test_plain_text_and_empty_eval_splits_give_no_score(db, tmp_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    project = create_project(db, "no score")
    text = tmp_path / "notes.txt"
    text.write_text("".join(f"Line number {i} of some plain prose.\n" for i in range(20)), encoding="utf-8")
    plain = import_dataset(db, project, str(text), eval_ratio=0.25)
    rows = load_dataset_split(db, plain.dataset.id, "eval")
    assert len(rows) > 0 and rows.column_names == ["text"]
    assert score_dataset(model, tokenizer, rows) is None
    assert "plain-text" in eval_examples(rows, tokenizer).reason

    source = write_jsonl(tmp_path / "chat.jsonl", [chat(("user", q), ("assistant", "a")) for q in QUESTIONS])
    no_eval = import_dataset(db, project, source, eval_ratio=0)
    rows = load_dataset_split(db, no_eval.dataset.id, "eval")
    assert len(rows) == 0 and len(load_dataset_split(db, no_eval.dataset.id, "train")) == 5
    assert score_dataset(model, tokenizer, rows) is None  # never the train split instead
    assert "empty" in eval_examples(rows, tokenizer).reason
