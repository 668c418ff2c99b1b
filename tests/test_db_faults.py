"""Opening a history that cannot be used as it is (issue 12, items 4 and 8), on real SQLite files:
locked by another process, read-only (the file, or the folder its journal must live in), empty
with project folders beside it. Each must say what is true and change nothing."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

import studio.db.engine as db_engine
from fault_helpers import hold_write_lock, make_read_only, release
from studio.db import (Database, DatabaseError, DatabaseLockedError, EmptyDatabaseError,
                       ReadOnlyDatabaseError)


@pytest.fixture
def history(tmp_path: Path) -> Path:
    """A real history with one project, closed: (its path)."""
    path = tmp_path / "projects" / "studio.db"
    db = Database(path)
    db.create_project("kept")
    db.close()
    return path


def test_locked_history_says_locked_not_move_aside(history: Path, monkeypatch) -> None:
    """Item 4: a `peft-studio train` started while another process held the write lock was told
    to 'move the file aside' (losing the history). It must say the file is locked, and fine."""
    monkeypatch.setattr(db_engine, "SQLITE_BUSY_MS", 300)  # the real 10 s would only slow the test
    holder = hold_write_lock(history)
    try:
        with pytest.raises(DatabaseLockedError) as info:
            Database(history)
    finally:
        release(holder)
    message = str(info.value)
    assert "locked" in message and "another PEFT Studio process" in message and str(history) in message
    assert "move it aside" not in message and "aside" not in message
    db = Database(history)  # once the lock is gone the same file opens, history intact
    try:
        assert [p.name for p in db.list_projects()] == ["kept"]
    finally:
        db.close()


def test_damaged_file_still_advises_moving_aside(tmp_path: Path) -> None:
    path = tmp_path / "studio.db"
    path.write_bytes(b"not a database at all " * 400)
    with pytest.raises(DatabaseError, match="not a database") as info:
        Database(path)
    assert "move it aside" in str(info.value) and not isinstance(info.value, DatabaseLockedError)


@pytest.mark.parametrize("what", ["file", "folder"])
def test_read_only_history_refused_at_start(history: Path, what: str) -> None:
    """Item 8: a read-only studio.db opened without a word, and every write then failed with a
    raw SQLAlchemy traceback. Database() must refuse it with a message saying so."""
    before = history.read_bytes()
    undo = make_read_only(history if what == "file" else history.parent)
    try:
        with pytest.raises(ReadOnlyDatabaseError) as info:
            Database(history)
    finally:
        undo()
    message = str(info.value)
    assert str(history) in message and "aside" not in message
    if what == "file":
        assert "read-only" in message
    else:  # SQLite cannot create the -wal and -shm files beside it
        assert str(history.parent) in message and "writable" in message
    assert history.read_bytes() == before  # nothing written, nothing replaced
    db = Database(history)
    try:
        assert [p.name for p in db.list_projects()] == ["kept"]
    finally:
        db.close()


def test_empty_file_beside_project_folders_is_kept(tmp_path: Path) -> None:
    """Item 8: a 0-byte studio.db was silently filled with a fresh schema, orphaning the project
    folders beside it. It must be refused and left exactly as it was."""
    projects = tmp_path / "projects"
    (projects / "my-project" / "runs").mkdir(parents=True)
    (projects / "models").mkdir()  # reserved: not a project
    path = projects / "studio.db"
    path.touch()
    with pytest.raises(EmptyDatabaseError) as info:
        Database(path)
    message = str(info.value)
    assert "empty" in message and "my-project" in message and "models" not in message
    assert path.stat().st_size == 0 and sorted(p.name for p in projects.iterdir()) == [
        "models", "my-project", "studio.db"]  # no -wal, -shm, no header written


def test_empty_file_with_its_wal_is_kept(tmp_path: Path) -> None:
    """SQLite deletes a -wal found beside a 0-byte database file; that log may hold the data."""
    path = tmp_path / "studio.db"
    path.touch()
    wal = tmp_path / "studio.db-wal"
    wal.write_bytes(b"\x37\x7f\x06\x82" + b"\0" * 60)
    with pytest.raises(EmptyDatabaseError, match="studio.db-wal"):
        Database(path)
    assert wal.stat().st_size == 64 and path.stat().st_size == 0


def test_header_only_file_beside_project_folders_is_refused(tmp_path: Path) -> None:
    """A file with an SQLite header but no tables (a fresh schema was never committed) is as
    empty as a 0-byte one: checked again under the write lock."""
    (tmp_path / "old-project").mkdir()
    path = tmp_path / "studio.db"
    sqlite3.connect(path).execute("PRAGMA journal_mode=WAL").close()
    assert path.stat().st_size > 0
    with pytest.raises(EmptyDatabaseError, match="old-project"):
        Database(path)


def test_empty_file_alone_starts_fresh(tmp_path: Path) -> None:
    """With nothing a fresh history could orphan, an empty file is simply used (a first start
    killed between creating the file and writing its schema leaves exactly this)."""
    path = tmp_path / "projects" / "studio.db"
    path.parent.mkdir()
    path.touch()
    db = Database(path)
    try:
        assert db.schema_version() == db_engine.SCHEMA_VERSION
    finally:
        db.close()

