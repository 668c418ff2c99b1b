"""Fixtures and helpers shared by the data-import tests."""


from __future__ import annotations

import json
import random
import tracemalloc
from pathlib import Path

import pytest

from studio.data import (DataError, EmptyFileError, FormatError, UnreadableFileError,
                         ValidationError, import_dataset, import_sample_task, load_dataset_split)
from studio.db import Database
from studio.projects import create_project, project_dir
from studio.samples import get_task, load_rows, prompt_text

DATA = Path(__file__).parent / "assets" / "data"


@pytest.fixture
def db(tmp_path):
    database = Database(tmp_path / "studio.db")
    yield database
    database.close()


@pytest.fixture
def project(db):
    return create_project(db, "Data test")


def stored(project) -> list[str]:
    """Everything under the project's datasets/ (temporary folders included)."""
    root = project_dir(project) / "datasets"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def assert_nothing_written(db, project) -> None:
    assert stored(project) == []
    assert db.list_datasets(project.id) == []


def rows(db, result, split="train") -> list[dict]:
    return load_dataset_split(db, result.dataset.id, split).to_list()


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def refused(db, project, path, error=ValidationError, **kw) -> DataError:
    with pytest.raises(error) as info:
        import_dataset(db, project, path, on_invalid="refuse", **kw)
    assert_nothing_written(db, project)
    return info.value
