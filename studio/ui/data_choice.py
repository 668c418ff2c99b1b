"""What to train or score on, as one dropdown value: ``sample:<task>`` (a built-in sample task)
or ``dataset:<id>`` (a dataset imported into the project). The only place that builds and parses
that encoding; the Train tab, the Bake-off, Compare's eval sets and History's clone all use it.
No gradio here: handlers and tests call it with plain values."""

from __future__ import annotations

from dataclasses import dataclass

from studio.db import Database
from studio.samples import SAMPLE_TASKS
from studio.ui import labels

SAMPLE, DATASET = "sample", "dataset"


@dataclass(frozen=True)
class DataChoice:
    sample_task: str | None = None
    dataset_id: int | None = None


def encode(sample_task: str | None = None, dataset_id: int | None = None) -> str | None:
    """The dropdown value for a sample task or a dataset id (None when neither is given)."""
    if sample_task is not None:
        return f"{SAMPLE}:{sample_task}"
    return f"{DATASET}:{dataset_id}" if dataset_id is not None else None


def decode(value: str | None) -> DataChoice:
    """The sample task or dataset id a dropdown value names; ``ValueError`` says what is wrong
    with anything else (an empty value is "nothing chosen", not an error)."""
    if not value:
        return DataChoice()
    kind, _, rest = str(value).partition(":")
    if kind == SAMPLE and rest:
        return DataChoice(sample_task=rest)
    if kind == DATASET and rest.isdigit():
        return DataChoice(dataset_id=int(rest))
    raise ValueError(f"not a data choice: {value!r} (expected '{SAMPLE}:<task>' or '{DATASET}:<id>')")


DEFAULT = encode(sample_task=next(iter(SAMPLE_TASKS)))  # a newcomer can press Start at once


def choices(db: Database, project_id: int | None) -> list[tuple[str, str]]:
    """(label, value) pairs: the sample tasks first (they need no Data-tab visit), then the
    project's datasets."""
    samples = [(labels.DATA_SAMPLE.format(title=t.title), encode(sample_task=name))
               for name, t in SAMPLE_TASKS.items()]
    datasets = [] if project_id is None else [
        (labels.DATA_DATASET.format(name=d.name, train=d.num_train, eval=d.num_eval), encode(dataset_id=d.id))
        for d in db.list_datasets(project_id)]
    return samples + datasets


def kept(current: str | None, offered: list[tuple[str, str]], fallback: str | None = DEFAULT) -> str | None:
    """``current`` if it is still offered, else ``fallback`` (a re-listing keeps what was picked)."""
    values = [value for _, value in offered]
    return current if current in values else fallback
