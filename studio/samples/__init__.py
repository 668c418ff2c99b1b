"""Sample tasks: small instruction datasets a newcomer can fine-tune on in a few minutes.

Each task is a short, strictly formatted instruction -> answer mapping (ISO dates, compact JSON,
one-word sentiment labels). The rows are written by the seeded generator in
``studio.samples.generate`` and committed under ``assets/samples/<name>/{train,eval}.jsonl``;
``studio.samples.scoring`` holds the exact-match metric used to evaluate them.

Rows are Alpaca style: ``{"instruction": ..., "input": ..., "output": ...}``. ``prompt_text``
turns a row into the user message the model sees, and is used identically for training and for
evaluation so the two never drift apart.

Imports nothing but the standard library and ``studio.config``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from studio import config

TRAIN_SIZE = 400
EVAL_SIZE = 50
SPLITS = ("train", "eval")
FIELDS = ("instruction", "input", "output")


def samples_dir() -> Path:
    """Where the committed sample datasets live: ``assets/samples``."""
    return config.assets_dir() / "samples"


@dataclass(frozen=True)
class SampleTask:
    """One sample task: what it is, the instruction every row carries, and where its rows live."""

    name: str
    title: str
    description: str
    instruction: str
    train_path: Path
    eval_path: Path

    def path(self, split: str) -> Path:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return self.train_path if split == "train" else self.eval_path


def _task(name: str, title: str, description: str, instruction: str) -> SampleTask:
    folder = samples_dir() / name
    return SampleTask(
        name=name,
        title=title,
        description=description,
        instruction=instruction,
        train_path=folder / "train.jsonl",
        eval_path=folder / "eval.jsonl",
    )


SAMPLE_TASKS: dict[str, SampleTask] = {
    task.name: task
    for task in (
        _task(
            "dates",
            "Dates to ISO 8601",
            "Rewrite a date such as 'the 5th of March, 2021' as 2021-03-05.",
            "Convert the date to ISO 8601 (YYYY-MM-DD).",
        ),
        _task(
            "json_fields",
            "Sentence to JSON",
            "Pull a person's name, age and city out of a sentence as one line of JSON.",
            "Extract the person's name, age and city as JSON with keys name, age, city.",
        ),
        _task(
            "sentiment",
            "Review sentiment",
            "Label a short product or restaurant review as positive or negative in one word.",
            "Classify the sentiment of the review as positive or negative. Answer with one word.",
        ),
    )
}


def get_task(name: str) -> SampleTask:
    """The task called ``name``; a KeyError naming the valid tasks otherwise."""
    try:
        return SAMPLE_TASKS[name]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(SAMPLE_TASKS))
        raise KeyError(f"unknown sample task {name!r}; valid names: {valid}") from None


def load_rows(task: SampleTask | str, split: str) -> list[dict]:
    """All rows of one split (``"train"`` or ``"eval"``) of a task, in file order."""
    if isinstance(task, str):
        task = get_task(task)
    path = task.path(split)
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def prompt_text(row: dict) -> str:
    """The user message the model sees for a row: the instruction, a blank line, the input."""
    instruction = row["instruction"].strip()
    text = (row.get("input") or "").strip()
    return f"{instruction}\n\n{text}" if text else instruction


__all__ = [
    "EVAL_SIZE",
    "FIELDS",
    "SAMPLE_TASKS",
    "SPLITS",
    "TRAIN_SIZE",
    "SampleTask",
    "get_task",
    "load_rows",
    "prompt_text",
    "samples_dir",
]
