"""The sample task datasets (studio.samples), their seeded generator and the exact-match scorer."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from studio import config
from studio.samples import (
    EVAL_SIZE,
    FIELDS,
    SAMPLE_TASKS,
    SPLITS,
    TRAIN_SIZE,
    SampleTask,
    get_task,
    load_rows,
    prompt_text,
)
from studio.samples import generate, scoring

TASK_NAMES = sorted(SAMPLE_TASKS)
COMMITTED = config.assets_dir() / "samples"


def _files(root: Path) -> dict[str, bytes]:
    return {
        f"{name}/{split}.jsonl": (root / name / f"{split}.jsonl").read_bytes()
        for name in TASK_NAMES
        for split in SPLITS
    }


@pytest.fixture(scope="module")
def rows() -> dict[str, dict[str, list[dict]]]:
    return {name: {split: load_rows(name, split) for split in SPLITS} for name in TASK_NAMES}


# --- registry -------------------------------------------------------------------------------------


def test_registry_names_and_paths():
    assert {"dates", "json_fields", "sentiment"} <= set(SAMPLE_TASKS)
    for name, task in SAMPLE_TASKS.items():
        assert isinstance(task, SampleTask) and task.name == name
        assert task.title and task.description and task.instruction
        assert task.train_path == COMMITTED / name / "train.jsonl"
        assert task.eval_path == COMMITTED / name / "eval.jsonl"
        assert task.path("train") == task.train_path and task.path("eval") == task.eval_path
        assert name in generate.MAKERS and name in scoring.NORMALIZERS
    with pytest.raises(dataclasses.FrozenInstanceError):
        SAMPLE_TASKS["dates"].name = "other"  # type: ignore[misc]


def test_get_task_unknown_lists_valid_names():
    assert get_task("dates") is SAMPLE_TASKS["dates"]
    with pytest.raises(KeyError) as info:
        get_task("nope")
    message = str(info.value)
    assert "nope" in message and all(name in message for name in TASK_NAMES)


def test_load_rows_rejects_unknown_split():
    with pytest.raises(ValueError, match="split"):
        load_rows("dates", "test")


def test_prompt_text_is_instruction_blank_line_input():
    row = {"instruction": "Do it.", "input": "March 5, 2021", "output": "2021-03-05"}
    assert prompt_text(row) == "Do it.\n\nMarch 5, 2021"


# --- generator ------------------------------------------------------------------------------------


def test_regenerating_default_seed_matches_committed_files(tmp_path):
    written = generate.write_all(tmp_path, generate.DEFAULT_SEED)
    assert len(written) == len(TASK_NAMES) * len(SPLITS)
    assert _files(tmp_path) == _files(COMMITTED)


def test_different_seed_gives_different_files(tmp_path):
    generate.write_all(tmp_path, generate.DEFAULT_SEED + 1)
    new, old = _files(tmp_path), _files(COMMITTED)
    for key in new:
        assert new[key] != old[key], key


def test_cli_writes_the_same_files(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "studio.samples.generate", "--out", str(tmp_path), "--seed", "7"],
        check=True,
        capture_output=True,
    )
    other = tmp_path / "again"
    generate.write_all(other, 7)
    assert _files(tmp_path) == _files(other)


def test_files_are_utf8_jsonl_with_trailing_newline():
    for name in TASK_NAMES:
        for split in SPLITS:
            data = SAMPLE_TASKS[name].path(split).read_bytes()
            assert data.endswith(b"\n") and b"\r" not in data
            for line in data.decode("utf-8").splitlines():
                assert json.loads(line)
    # non-ASCII survives unescaped (ensure_ascii=False)
    assert "\\u" not in SAMPLE_TASKS["json_fields"].train_path.read_text(encoding="utf-8")


def test_split_unique_refuses_when_inputs_run_out():
    with pytest.raises(RuntimeError):
        generate.split_unique(lambda rng: ("same", "x"), generate.random.Random(0), 2, 1,
                              max_draws=100)


# --- dataset shape --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TASK_NAMES)
def test_sizes_fields_and_no_overlap(rows, name):
    train, evals = rows[name]["train"], rows[name]["eval"]
    assert (len(train), len(evals)) == (TRAIN_SIZE, EVAL_SIZE)
    for row in train + evals:
        assert tuple(row) == FIELDS
        assert all(isinstance(row[f], str) and row[f].strip() for f in FIELDS), row
        assert row["instruction"] == SAMPLE_TASKS[name].instruction
    train_inputs = [row["input"] for row in train]
    eval_inputs = [row["input"] for row in evals]
    assert len(set(train_inputs)) == len(train_inputs)
    assert len(set(eval_inputs)) == len(eval_inputs)
    assert not set(train_inputs) & set(eval_inputs)


# --- dates ----------------------------------------------------------------------------------------

MONTH_WORDS = {
    "january": 1, "february": 2, "march": 3, "april": 4, "may": 5, "june": 6, "july": 7,
    "august": 8, "september": 9, "october": 10, "november": 11, "december": 12,
    "jan": 1, "feb": 2, "mar": 3, "apr": 4, "jun": 6, "jul": 7, "aug": 8, "sep": 9,
    "oct": 10, "nov": 11, "dec": 12,
}
WEEKDAY_WORDS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]


def parse_human_date(text: str) -> tuple[dt.date, str | None]:
    """An independent reading of a generated date: (date, weekday word or None)."""
    words = re.findall(r"[A-Za-z]+", text.lower())
    months = [MONTH_WORDS[w] for w in words if w in MONTH_WORDS]
    weekdays = [w for w in words if w in WEEKDAY_WORDS]
    years = re.findall(r"\b(\d{4})\b", text)
    days = re.findall(r"\b(\d{1,2})(?:st|nd|rd|th)?\b", text)
    assert len(months) == 1 and len(years) == 1 and len(days) == 1 and len(weekdays) <= 1, text
    return dt.date(int(years[0]), months[0], int(days[0])), (weekdays[0] if weekdays else None)


def test_parse_human_date_helper():
    assert parse_human_date("Friday, March 5, 2021") == (dt.date(2021, 3, 5), "friday")
    assert parse_human_date("the 21st of May, 1999") == (dt.date(1999, 5, 21), None)


def test_dates_outputs_match_inputs(rows):
    styles_with_weekday = 0
    for row in rows["dates"]["train"] + rows["dates"]["eval"]:
        out = dt.date.fromisoformat(row["output"])
        assert row["output"] == out.isoformat()  # zero-padded YYYY-MM-DD
        assert 1950 <= out.year <= 2035
        parsed, weekday = parse_human_date(row["input"])
        assert parsed == out, row
        if weekday is not None:
            styles_with_weekday += 1
            assert weekday == WEEKDAY_WORDS[out.weekday()], row
    assert styles_with_weekday > 20  # the weekday styles are actually used


def test_dates_use_many_styles(rows):
    shapes = {re.sub(r"\d+", "9", re.sub(r"[A-Za-z]+", "W", r["input"]))
              for r in rows["dates"]["train"]}
    assert len(shapes) >= 6, shapes


def test_ordinal():
    got = [generate.ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 31)]
    assert got == ["1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd",
                   "31st"]


# --- json_fields ----------------------------------------------------------------------------------


def test_json_fields_outputs(rows):
    for row in rows["json_fields"]["train"] + rows["json_fields"]["eval"]:
        value = json.loads(row["output"])
        assert list(value) == ["name", "age", "city"]
        assert type(value["age"]) is int and 18 <= value["age"] < 90
        assert isinstance(value["name"], str) and isinstance(value["city"], str)
        assert value["name"] in row["input"] and value["city"] in row["input"], row
        assert re.search(rf"\b{value['age']}\b", row["input"]), row
        # the canonical compact form: json.dumps with default separators, keys in order
        assert row["output"] == json.dumps(value, ensure_ascii=False)


# --- sentiment ------------------------------------------------------------------------------------


def test_sentiment_labels_balanced(rows):
    for split in SPLITS:
        counts = Counter(row["output"] for row in rows["sentiment"][split])
        assert set(counts) == {"positive", "negative"}
        total = sum(counts.values())
        assert abs(counts["positive"] - counts["negative"]) <= 0.1 * total, (split, counts)


def test_sentiment_wording_agrees_with_label(rows):
    for row in rows["sentiment"]["train"] + rows["sentiment"]["eval"]:
        # the one sanctioned negation, "not bad at all", is positive
        text = row["input"].lower().replace("not bad at all", "")
        pos = any(re.search(rf"\b{w}\b", text) for w in generate.POSITIVE_WORDS)
        neg = any(re.search(rf"\b{w}\b", text) for w in generate.NEGATIVE_WORDS)
        assert (pos, neg) == ((True, False) if row["output"] == "positive" else (False, True)), row


# --- scorer ---------------------------------------------------------------------------------------

CANON = '{"name": "Maria", "age": 34, "city": "Lisbon"}'

SCORER_CASES = [
    ("dates", "2021-03-05", "2021-03-05", True),
    ("dates", "2021-03-05\n", "2021-03-05", True),
    ("dates", "  2021-03-05 ", "2021-03-05", True),
    ("dates", "The date is 2021-03-05", "2021-03-05", False),
    ("dates", "2021-03-05.", "2021-03-05", False),
    ("dates", "2021-3-5", "2021-03-05", False),
    ("dates", "2021-03-06", "2021-03-05", False),
    ("sentiment", "positive", "positive", True),
    ("sentiment", "Positive.", "positive", True),
    ("sentiment", " NEGATIVE\n", "negative", True),
    ("sentiment", "positive sentiment", "positive", False),
    ("sentiment", "The review is positive.", "positive", False),
    ("sentiment", "positive..", "positive", False),
    ("sentiment", "negative", "positive", False),
    ("json_fields", CANON, CANON, True),
    ("json_fields", '{"name":"Maria","age":34,"city":"Lisbon"}', CANON, True),
    ("json_fields", '{\n  "city": "Lisbon",\n  "name": "Maria",\n  "age": 34\n}\n', CANON, True),
    ("json_fields", '{"name": "Maria", "age": "34", "city": "Lisbon"}', CANON, False),
    ("json_fields", '{"name": "Maria", "age": 34.0, "city": "Lisbon"}', CANON, False),
    ("json_fields", '{"name": "maria", "age": 34, "city": "Lisbon"}', CANON, False),
    ("json_fields", '{"name": "Maria", "age": 34}', CANON, False),
    ("json_fields", '{"name": "Maria", "age": 34, "city": "Lisbon"', CANON, False),
    ("json_fields", "```json\n" + CANON + "\n```", CANON, False),
    ("json_fields", CANON + " That is the JSON.", CANON, False),
    ("json_fields", '{"name": "Maria", "age": NaN, "city": "Lisbon"}', CANON, False),
    ("json_fields", "not json", "not json", False),
]


@pytest.mark.parametrize(("task", "prediction", "reference", "expected"), SCORER_CASES)
def test_exact_match(task, prediction, reference, expected):
    assert scoring.exact_match(task, prediction, reference) is expected


def test_normalize():
    assert scoring.normalize("dates", " 2021-03-05\n") == "2021-03-05"
    assert scoring.normalize("sentiment", "Negative.") == "negative"
    assert scoring.normalize("json_fields", '{"b": 1, "a": 2}') == '{"a":2,"b":1}'
    assert scoring.normalize("json_fields", " nope ") == "nope"
    with pytest.raises(KeyError, match="dates"):
        scoring.normalize("unknown", "x")


def test_exact_match_rate():
    refs = ["positive", "negative", "positive", "negative"]
    preds = ["Positive.", "negative", "The review is positive.", "positive"]
    assert scoring.exact_match_rate("sentiment", preds, refs) == 0.5
    assert scoring.exact_match_rate("dates", ["2021-03-05"], ["2021-03-05"]) == 1.0
    with pytest.raises(ValueError):
        scoring.exact_match_rate("dates", ["a"], ["a", "b"])
    with pytest.raises(ValueError):
        scoring.exact_match_rate("dates", [], [])


@pytest.mark.parametrize("name", TASK_NAMES)
def test_references_score_perfectly_against_themselves(rows, name):
    refs = [row["output"] for row in rows[name]["eval"]]
    assert scoring.exact_match_rate(name, refs, refs) == 1.0
