"""Schema 2 (bake-offs and the run queue): a history file written at schema 1 migrates.

The schema-1 file is ``tests/assets/db/studio-v1.sql``, dumped from a file that the schema-1
code wrote (a project, a dataset, a finished run with metrics, a checkpoint, an export, and a
run left "queued").
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from studio.db import SCHEMA_VERSION, Database

V1_DUMP = Path(__file__).parent / "assets" / "db" / "studio-v1.sql"


def v1_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.executescript(V1_DUMP.read_text(encoding="utf-8"))
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    return path


def shape(path: Path) -> dict:
    """Tables with their columns, indexes and foreign keys, as SQLite reports them."""
    conn = sqlite3.connect(path)
    try:
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        return {t: {"columns": conn.execute(f"PRAGMA table_info({t})").fetchall(),
                    "indexes": sorted((r[1], r[2]) for r in conn.execute(f"PRAGMA index_list({t})")),
                    "foreign_keys": sorted(r[2:] for r in conn.execute(f"PRAGMA foreign_key_list({t})"))}
                for t in tables}
    finally:
        conn.close()


@pytest.fixture
def migrated(tmp_path):
    path = v1_file(tmp_path / "old" / "studio.db")
    db = Database(path)
    yield db
    db.close()


def test_the_v1_file_is_really_v1():
    assert SCHEMA_VERSION >= 2  # later schemas migrate through 2 (their steps run after it)
    text = V1_DUMP.read_text(encoding="utf-8")
    assert "CREATE TABLE runs" in text and "bakeoffs" not in text and "queued_at" not in text


def test_a_v1_file_migrates_and_keeps_everything(migrated):
    db = migrated
    assert db.schema_version() == SCHEMA_VERSION and db.integrity_check() == "ok"
    (project,) = db.list_projects()
    assert project.name == "Made by schema 1"
    runs = {r.name: r for r in db.list_runs(project.id)}
    done, waiting = runs["lora on dates"], runs["waiting"]
    assert done.status == "completed" and done.spec["max_steps"] == 4 and done.queued_at is None
    assert [(m.step, m.name, m.value) for m in db.metrics_for(done.id, ["loss"])] == [(1, "loss", 2.5), (2, "loss", 2.0)]
    assert [c.path for c in db.list_checkpoints(done.id)] == ["checkpoints/checkpoint-2"]
    assert [e.status for e in db.list_exports(project.id)] == ["verified"]
    # A run that was only created under schema 1 is not in the dispatch queue.
    assert waiting.status == "queued" and db.waiting_runs() == []

    row = db.create_bakeoff(project.id, "after migration", "default", ["lora", "ia3"], {"max_steps": 5},
                            [done.id, waiting.id], sample_task="dates")
    assert db.bakeoff_for_run(waiting.id).id == row.id and db.list_bakeoffs(project.id)[0].id == row.id
    db.enqueue_runs([waiting.id])
    assert [r.id for r in db.waiting_runs()] == [waiting.id]
    db.delete_project(project.id)  # the new table's cascade works in a migrated file
    assert db.get_bakeoff(row.id) is None


def test_a_migrated_file_has_the_same_schema_as_a_fresh_one(migrated, tmp_path):
    fresh = Database(tmp_path / "fresh" / "studio.db")
    fresh.close()
    assert shape(migrated.path) == shape(fresh.path)


def test_migrating_twice_or_reopening_changes_nothing(migrated):
    before = shape(migrated.path)
    migrated.close()
    again = Database(migrated.path)
    try:
        assert again.schema_version() == SCHEMA_VERSION and shape(again.path) == before
    finally:
        again.close()
