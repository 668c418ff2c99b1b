"""studio.db against real SQLite files: round trips, constraints, migrations, and kill -9."""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

import studio.db as dbm
import studio.db.engine as db_engine  # owns SCHEMA_VERSION and MIGRATIONS: patch them there
from studio.db import Database, DatabaseError, MigrationError, NewerSchemaError, RunStatus

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "projects" / "studio.db"


@pytest.fixture
def db(db_path: Path):
    database = Database(db_path)
    yield database
    database.close()


def raw(path: Path, sql: str):
    """Reads straight through the stdlib driver, bypassing studio.db."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_round_trip_survives_reopen(db: Database, db_path: Path) -> None:
    project = db.create_project("  Demo  ", model_source="hf:some/model")
    assert project.name == "Demo" and project.folder == "demo"
    dataset = db.add_dataset(project.id, name="alpaca", folder="alpaca", source_path="/x.jsonl",
                             source_hash="abc", format="jsonl", mapping={"prompt": "instruction"},
                             num_rows=10, num_train=9, num_eval=1, stats={"tokens": [1, 2]})
    spec = {"method": "lora", "r": 8, "targets": ["q_proj", "v_proj"], "lr": 2e-4}
    run = db.create_run(project.id, "first", "lora", spec, dataset_id=dataset.id)
    db.log_metrics(run.id, 1, {"loss": 2.5, "lr": 1e-4}, wall_time=10.0)
    db.log_metrics(run.id, 2, {"loss": 2.0}, wall_time=11.0)
    db.log_metrics(run.id, 2, {"loss": 1.9}, wall_time=12.0)  # resumed run re-logs step 2
    db.log_metrics(run.id, 3, {"loss": float("nan")}, wall_time=13.0)  # diverged, still kept
    db.add_checkpoint(run.id, 2, "ckpt/step-2")
    db.add_checkpoint(run.id, 4, "ckpt/step-4")
    db.add_checkpoint(run.id, 2, "ckpt/step-2-again")  # replaced, not duplicated
    export = db.add_export(project.id, "merged", "exports/m", run_id=run.id, dtype="bf16")
    db.update_export(export.id, status="verified", size_bytes=123, verification={"ppl": 9.5})
    started = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    db.update_run(run.id, status=RunStatus.RUNNING, pid=4242, started_at=started)
    db.close()

    again = Database(db_path)
    try:
        assert [p.name for p in again.list_projects()] == ["Demo"]
        p = again.get_project_by_name("demo")  # names compare case-insensitively
        assert (p.id, p.folder, p.model_source) == (project.id, "demo", "hf:some/model")
        assert p.created_at.tzinfo is not None
        (d,) = again.list_datasets(project.id)
        assert d.mapping == {"prompt": "instruction"} and d.stats == {"tokens": [1, 2]}
        assert (d.num_rows, d.num_train, d.num_eval) == (10, 9, 1)
        assert again.find_dataset_by_hash(project.id, "abc").id == dataset.id
        assert again.find_dataset_by_hash(project.id, "nope") is None
        r = again.get_run(run.id)
        assert r.spec == spec and r.dataset_id == dataset.id and r.status == "running"
        assert r.pid == 4242 and r.started_at == started
        metrics = again.metrics_for(run.id)
        assert [(m.step, m.name) for m in metrics] == [(1, "loss"), (1, "lr"), (2, "loss"),
                                                       (3, "loss")]
        assert [m.value for m in metrics[:3]] == [2.5, 1e-4, 1.9]
        assert metrics[2].wall_time == 12.0 and math.isnan(metrics[3].value)
        assert [m.step for m in again.metrics_for(run.id, names=["loss"], since_step=1)] == [2, 3]
        assert again.last_step(run.id) == 3
        assert [(c.step, c.path) for c in again.list_checkpoints(run.id)] == [
            (2, "ckpt/step-2-again"), (4, "ckpt/step-4")]
        assert again.latest_checkpoint(run.id).step == 4
        (e,) = again.list_exports(project.id)
        assert (e.kind, e.path, e.dtype, e.status, e.size_bytes) == (
            "merged", "exports/m", "bf16", "verified", 123)
        assert e.verification == {"ppl": 9.5} and e.run_id == run.id
    finally:
        again.close()


def test_pragmas_and_version(db: Database, db_path: Path) -> None:
    assert db.journal_mode() == "wal"
    assert db.schema_version() == dbm.SCHEMA_VERSION
    assert raw(db_path, "PRAGMA user_version") == [(dbm.SCHEMA_VERSION,)]
    assert db.integrity_check() == "ok"


def test_foreign_keys_cascade(db: Database) -> None:
    keep = db.create_project("keep")
    gone = db.create_project("gone")
    dataset = db.add_dataset(gone.id, name="d")
    runs = [db.create_run(p.id, "r", "lora", {}, dataset_id=None) for p in (keep, gone)]
    gone_run = db.create_run(gone.id, "r2", "lora", {}, dataset_id=dataset.id)
    for r in [*runs, gone_run]:
        db.log_metrics(r.id, 1, {"loss": 1.0})
        db.add_checkpoint(r.id, 1, "c")
    db.add_export(gone.id, "adapter", "x", run_id=gone_run.id)
    assert db.delete_project(gone.id) == "gone"
    assert db.get_project(gone.id) is None
    assert [r.id for r in db.list_runs()] == [runs[0].id]
    assert db.metrics_for(gone_run.id) == [] and db.list_checkpoints(gone_run.id) == []
    assert db.list_exports(gone.id) == [] and db.list_datasets(gone.id) == []
    assert len(db.metrics_for(runs[0].id)) == 1  # the other project is untouched
    with pytest.raises(LookupError):
        db.create_run(gone.id, "late", "lora", {})
    with pytest.raises(LookupError):
        db.log_metrics(gone_run.id, 2, {"loss": 1.0})


def test_run_lifecycle(db: Database) -> None:
    p = db.create_project("p")
    d = db.add_dataset(p.id, name="d")
    a = db.create_run(p.id, "a", "lora", {"x": 1}, dataset_id=d.id)
    b = db.create_run(p.id, "b", "dora", {"x": 2})
    assert [r.id for r in db.list_runs(p.id)] == [b.id, a.id]  # newest first
    assert db.heartbeat(a.id) is None and db.get_run(a.id).heartbeat_at is not None
    with pytest.raises(ValueError):
        db.request_cancel(a.id, "later")
    db.request_cancel(a.id, "save")
    assert db.heartbeat(a.id) == "save"  # the worker learns of the cancel on its heartbeat
    db.update_run(b.id, status="running")
    with pytest.raises(ValueError):
        db.update_run(b.id, status="exploded")
    with pytest.raises(TypeError):
        db.update_run(b.id, colour="red")
    with pytest.raises(ValueError):
        db.update_run(b.id, started_at=datetime(2030, 1, 1))  # naive: ambiguous
    assert [r.id for r in db.runs_with_status("queued", RunStatus.RUNNING)] == [a.id, b.id]
    assert [r.id for r in db.runs_with_status("running")] == [b.id]
    db.add_checkpoint(b.id, 5, "c")
    db.update_run(b.id, folder="runs/b")
    assert db.delete_run(b.id) == "runs/b"
    assert db.get_run(b.id) is None and db.list_checkpoints(b.id) == []
    with pytest.raises(LookupError):
        db.update_run(b.id, status="failed")
    assert db.last_step(a.id) is None and db.latest_checkpoint(a.id) is None


def test_project_names_and_folders(db: Database, db_path: Path) -> None:
    for bad in ("", "   ", "x" * (dbm.NAME_MAX + 1)):
        with pytest.raises(ValueError, match="name|characters"):
            db.create_project(bad)
    first = db.create_project("My Project")
    with pytest.raises(ValueError, match="a project named 'My Project' already exists"):
        db.create_project("my project ")
    second = db.create_project("my-project!")  # same slug, different name
    third = db.create_project("MY_PROJECT")
    assert [first.folder, second.folder, third.folder] == ["my-project", "my-project-2",
                                                           "my-project-3"]
    (db_path.parent / "leftover").mkdir()  # files of an earlier project still on disk
    assert db.create_project("Leftover").folder == "leftover-2"
    assert db.create_project("models").folder == "models-2"  # projects/models is reserved

    renamed = db.rename_project(first.id, "  Renamed  ")
    assert (renamed.name, renamed.folder) == ("Renamed", "my-project")
    assert db.get_project(first.id).folder == "my-project"
    assert db.get_project_by_name("My Project") is None
    db.rename_project(first.id, "renamed")  # a case change of its own name is fine
    with pytest.raises(ValueError, match="already exists"):
        db.rename_project(first.id, "my-project!")
    with pytest.raises(ValueError):
        db.rename_project(first.id, " ")
    assert db.create_project("My Project").folder == "my-project-4"  # folder never reused

    # touching moves a project to the top of the list
    db.touch_project(second.id)
    assert db.list_projects()[0].id == second.id


WRITER = r"""
import sys
from pathlib import Path
from studio.db import Database, Metric
db = Database(Path(sys.argv[1]))
run_id, step = int(sys.argv[2]), 0
while True:
    for _ in range(10):  # many small transactions
        step += 1
        db.log_metrics(run_id, step, {"loss": 1.0 / step, "lr": 1e-4})
    step += 1
    with db.session() as s:  # one larger transaction: all 300 rows or none
        s.add_all(Metric(run_id=run_id, step=step, name=f"big{i}", value=float(i),
                         wall_time=0.0) for i in range(300))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")
def test_killed_writer_leaves_a_sound_file(db_path: Path) -> None:
    db = Database(db_path)
    project = db.create_project("killed")
    db.close()
    for attempt in range(3):
        db = Database(db_path)
        run = db.create_run(project.id, f"r{attempt}", "lora", {})
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db_path), str(run.id)],
                                cwd=REPO, stderr=subprocess.PIPE)
        try:
            seen, deadline = 0, time.monotonic() + 8
            while seen < 400 + 300 * attempt:  # vary where in the loop the kill lands
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "the writer committed too little in time"
                time.sleep(0.01)
                seen = len(db.metrics_for(run.id))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL
        db.close()

        db = Database(db_path)
        assert db.integrity_check() == "ok"
        rows = db.metrics_for(run.id)
        assert len(rows) >= seen
        big: dict[int, int] = {}
        for m in rows:
            if m.name.startswith("big"):
                big[m.step] = big.get(m.step, 0) + 1
        assert big and set(big.values()) == {300}  # no half-committed transaction
        db.log_metrics(run.id, 10**6, {"after": 1.0})  # still writable
        assert db.last_step(run.id) == 10**6
        db.close()


def _add_color(conn) -> None:
    conn.exec_driver_sql("ALTER TABLE projects ADD COLUMN color VARCHAR DEFAULT 'blue'")


# The migration machinery is tested with a synthetic step after the current schema, so these
# tests stay valid as real steps are added (schema 2: tests/test_bakeoff_migration.py).
CURRENT = db_engine.SCHEMA_VERSION
NEXT = CURRENT + 1


def _v1_file(path: Path) -> int:
    db = Database(path)
    project_id = db.create_project("old").id
    db.close()
    return project_id


def test_migration_step_applies(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project_id = _v1_file(db_path)
    monkeypatch.setattr(db_engine, "SCHEMA_VERSION", NEXT)
    monkeypatch.setattr(db_engine, "MIGRATIONS",
                        [*db_engine.MIGRATIONS, (NEXT, "project colour", _add_color)])
    db = Database(db_path)
    try:
        assert db.schema_version() == NEXT
        assert db.get_project(project_id).name == "old"
    finally:
        db.close()
    assert ("color",) in [(r[1],) for r in raw(db_path, "PRAGMA table_info(projects)")]
    assert raw(db_path, "SELECT color FROM projects") == [("blue",)]
    Database(db_path).close()  # opening again at the new version runs nothing twice


def test_failed_migration_leaves_previous_version(db_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    project_id = _v1_file(db_path)

    def half_done(conn) -> None:
        _add_color(conn)  # DDL that must be rolled back with the rest of the step
        conn.exec_driver_sql("DELETE FROM projects")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(db_engine, "SCHEMA_VERSION", NEXT)
    monkeypatch.setattr(db_engine, "MIGRATIONS", [*db_engine.MIGRATIONS, (NEXT, "broken", half_done)])
    with pytest.raises(MigrationError, match="disk on fire") as info:
        Database(db_path)
    assert str(db_path) in str(info.value) and f"schema {CURRENT}" in str(info.value)
    assert raw(db_path, "PRAGMA user_version") == [(CURRENT,)]
    assert "color" not in [r[1] for r in raw(db_path, "PRAGMA table_info(projects)")]
    monkeypatch.undo()
    db = Database(db_path)
    try:
        assert db.get_project(project_id).name == "old" and db.schema_version() == CURRENT
    finally:
        db.close()


def test_missing_migration_step_is_refused(db_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    _v1_file(db_path)
    monkeypatch.setattr(db_engine, "SCHEMA_VERSION", NEXT)
    with pytest.raises(MigrationError, match=f"schema {NEXT}"):
        Database(db_path)
    assert raw(db_path, "PRAGMA user_version") == [(CURRENT,)]


def test_newer_schema_is_refused(db_path: Path) -> None:
    _v1_file(db_path)
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(NewerSchemaError, match=r"newer PEFT Studio \(schema 99\)") as info:
        Database(db_path)
    assert str(db_path) in str(info.value) and "upgrade" in str(info.value).lower()
    assert raw(db_path, "PRAGMA user_version") == [(99,)]  # left alone


def test_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "studio.db"
    path.write_bytes(os.urandom(8192))
    with pytest.raises(DatabaseError, match="not a database") as info:
        Database(path)
    assert str(path) in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_foreign_tables_without_version(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    raw(path, "CREATE TABLE notes (id INTEGER PRIMARY KEY)")
    with pytest.raises(DatabaseError, match="not a PEFT Studio history"):
        Database(path)


def test_default_path_follows_studio_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEFT_STUDIO_HOME", str(tmp_path / "home"))
    db = Database()
    try:
        assert db.path == tmp_path / "home" / "projects" / "studio.db"
        assert db.path.exists() and db.schema_version() == dbm.SCHEMA_VERSION
    finally:
        db.close()
