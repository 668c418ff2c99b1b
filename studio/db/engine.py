"""Opening the history file: the SQLite engine, its connection pragmas and explicit
transactions, and bringing the schema to ``SCHEMA_VERSION`` through ``MIGRATIONS``.

The errors raised when a file cannot be used live here too. ``open_engine`` reads
``SCHEMA_VERSION`` and ``MIGRATIONS`` from this module at call time, so patch them here
(``studio.db.engine``), not on ``studio.db``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, exc
from sqlalchemy.engine import URL

from .schema import RESERVED_FOLDERS, Base

SCHEMA_VERSION = 4


class DatabaseError(RuntimeError):
    """The history file cannot be used as it is; the message says which file and why."""


class NewerSchemaError(DatabaseError):
    """The file was written by a newer PEFT Studio than this one."""


class MigrationError(DatabaseError):
    """A migration step failed; the file was left at the last version that completed."""


class DatabaseLockedError(DatabaseError):
    """Another process held the write lock longer than the busy timeout; the file is sound."""


class ReadOnlyDatabaseError(DatabaseError):
    """The file (or the folder that must hold its journal files) cannot be written."""


class EmptyDatabaseError(DatabaseError):
    """An existing file holds no history at all while project folders lie beside it: a fresh
    schema written into it would silently orphan them, so it is refused and left as it is."""


SQLITE_BUSY_MS = 10_000  # how long a connection waits for another process's write lock
# A file named JOB beside studio.db marks the history of a cluster job (``studio.jobs``): the job
# folder may sit on a shared file system (NFS, Lustre) and be opened from several hosts, where
# WAL cannot work (its -shm index is shared memory of one host); such a history uses SQLite's
# rollback journal, and only a job's main rank writes it.
JOB_MARKER = "JOB"


def rollback_journal(path: Path) -> bool:
    """True for a job's history (``JOB_MARKER`` beside it): journal_mode=DELETE, not WAL."""
    return (Path(path).parent / JOB_MARKER).is_file()


# Why not alembic: there is one embedded SQLite file per user, and it must be upgraded on app
# start with no extra tooling or migration scripts on disk. ``PRAGMA user_version`` plus an
# ordered list of steps, each run in one transaction that also bumps user_version, is atomic
# (SQLite DDL is transactional) and tiny. A fresh file gets the current schema from the models
# directly, so each step only has to take version N-1 to N. A step is
# ``(version, description, function(connection))``; it runs inside the transaction and must
# not commit. (Steps that rebuild a table need foreign_keys=OFF, which SQLite ignores inside a
# transaction: do such a rebuild with the copy/rename procedure and check foreign_key_check.)
Migration = tuple[int, str, Callable[[Connection], None]]


def _v2_bakeoffs_and_queue(conn: Connection) -> None:
    """Schema 2 (issue 8): the ``bakeoffs`` table and ``runs.queued_at`` (the dispatch queue).

    The DDL is written out, not taken from ``schema.Bakeoff``: a later change to the model must
    not change what this step did (tests/test_bakeoff_migration.py checks that a migrated file
    and a fresh one have the same tables, columns and indexes)."""
    conn.exec_driver_sql("ALTER TABLE runs ADD COLUMN queued_at DATETIME")
    conn.exec_driver_sql("""
        CREATE TABLE bakeoffs (
            id INTEGER NOT NULL,
            project_id INTEGER NOT NULL,
            dataset_id INTEGER,
            name VARCHAR NOT NULL,
            model VARCHAR NOT NULL,
            sample_task VARCHAR,
            methods JSON NOT NULL,
            budget JSON NOT NULL,
            run_ids JSON NOT NULL,
            "table" JSON,
            notes JSON,
            created_at DATETIME NOT NULL,
            updated_at DATETIME NOT NULL,
            PRIMARY KEY (id),
            FOREIGN KEY(project_id) REFERENCES projects (id) ON DELETE CASCADE,
            FOREIGN KEY(dataset_id) REFERENCES datasets (id) ON DELETE SET NULL
        )""")
    conn.exec_driver_sql("CREATE INDEX ix_bakeoffs_project_id ON bakeoffs (project_id)")
    conn.exec_driver_sql("CREATE INDEX ix_bakeoffs_dataset_id ON bakeoffs (dataset_id)")


def _v3_run_activity(conn: Connection) -> None:
    """Schema 3 (issue 15): ``runs.activity``, what the worker is doing between steps
    (evaluating k of n), written with its heartbeat."""
    conn.exec_driver_sql("ALTER TABLE runs ADD COLUMN activity JSON")


def _v4_run_recipe(conn: Connection) -> None:
    """Schema 4 (issue 17): ``runs.recipe``, how a composed (derived) adapter was made from its
    parent runs; NULL for every trained run, so existing rows need nothing."""
    conn.exec_driver_sql("ALTER TABLE runs ADD COLUMN recipe JSON")


MIGRATIONS: list[Migration] = [
    (2, "bake-offs and the run queue", _v2_bakeoffs_and_queue),
    (3, "what a running worker is doing", _v3_run_activity),
    (4, "composed adapters' recipes", _v4_run_recipe),
]


def _user_version(conn: Connection) -> int:
    return int(conn.exec_driver_sql("PRAGMA user_version").scalar_one())


def _set_user_version(conn: Connection, version: int) -> None:
    conn.exec_driver_sql(f"PRAGMA user_version = {int(version)}")


def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any, rollback: bool = False) -> None:
    # Take BEGIN away from the sqlite3 module (it skips it for DDL, which would make migrations
    # non-atomic); _on_begin emits it instead.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    # First, so that even the pragmas below wait for another process instead of failing.
    cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_MS)}")
    # WAL + synchronous=NORMAL: a kill -9 of any process mid-write leaves the file consistent
    # and keeps every committed transaction; only an OS crash or power cut can lose the last
    # few commits (never corrupt the file). Readers never block the writer and vice versa.
    if rollback:  # a job's history (JOB_MARKER), see there
        cur.execute("PRAGMA journal_mode=DELETE")
        cur.execute("PRAGMA synchronous=FULL")  # SQLite's default there: a commit is on disk
    else:
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")  # per connection in SQLite; needed for the cascades
    cur.close()


def _on_begin(conn: Connection) -> None:
    # Write sessions take the write lock up front (BEGIN IMMEDIATE). A deferred transaction
    # that reads and then writes can fail at once with SQLITE_BUSY when another process
    # committed in between; busy_timeout cannot help there, but it does help IMMEDIATE.
    mode = conn.get_execution_options().get("studio_begin", "")
    conn.exec_driver_sql(f"BEGIN {mode}".strip())


def open_engine(path: Path) -> tuple[Engine, Engine]:
    """Opens ``path``, creating or upgrading its schema; returns ``(engine, write_engine)``.

    ``write_engine`` is the same engine with BEGIN IMMEDIATE transactions. Any failure
    disposes the engine and raises a ``DatabaseError`` that names the file and says what is
    true: locked by another process, read-only, or damaged (only then: move it aside)."""
    existed = path.exists()  # before SQLite creates it: an existing empty file is not "fresh"
    if existed:
        _refuse_empty_file(path)
    engine = create_engine(URL.create("sqlite", database=str(path)))
    rollback = rollback_journal(path)
    event.listen(engine, "connect", lambda conn, record: _on_connect(conn, record, rollback))
    event.listen(engine, "begin", _on_begin)
    write_engine = engine.execution_options(studio_begin="IMMEDIATE")
    try:
        _migrate(write_engine, path, existed)
        _check_writable(write_engine, path)
    except DatabaseError:
        engine.dispose()
        raise
    except (exc.DBAPIError, sqlite3.Error) as err:
        engine.dispose()
        raise _explain(path, getattr(err, "orig", None) or err) from None
    return engine, write_engine


# SQLite's own words for a file that is not (or no longer) a database. Only for these is moving
# the file aside the right advice: for a lock or a permission it would throw a sound history away.
_DAMAGED = ("not a database", "malformed", "file is encrypted")


def _explain(path: Path, reason: BaseException) -> DatabaseError:
    text = str(reason)
    low = text.lower()
    if "locked" in low or "busy" in low:
        return DatabaseLockedError(
            f"the PEFT Studio history {path} is locked: another PEFT Studio process (the app, a "
            f"command or a training worker) kept it busy for more than {SQLITE_BUSY_MS // 1000} s. "
            "Nothing is wrong with the file; try again in a moment.")
    if "readonly" in low or "read-only" in low:
        return _read_only(path, text)
    if "unable to open" in low and path.exists():  # the file is there: its folder refuses the journal
        return ReadOnlyDatabaseError(
            f"cannot open the PEFT Studio history {path}: {text}. SQLite must read it and "
            f"create {path.name}-wal and {path.name}-shm beside it: make the folder "
            f"{path.parent} writable and the file readable (and check that the disk has free "
            "space). The file itself may be fine; do not replace it.")
    if "disk is full" in low or "no space" in low:
        return DatabaseError(f"cannot write the PEFT Studio history {path}: the disk is full. "
                             "Free some space and try again; the file is unchanged.")
    if any(word in low for word in _DAMAGED):
        return DatabaseError(
            f"cannot open the PEFT Studio history {path}: {text}. The file is damaged or not a "
            "PEFT Studio database: move it aside (keep it, it may be recoverable) and PEFT "
            "Studio starts a fresh one.")
    return DatabaseError(f"cannot open the PEFT Studio history {path}: {text}.")


def _read_only(path: Path, reason: str) -> ReadOnlyDatabaseError:
    return ReadOnlyDatabaseError(
        f"the PEFT Studio history {path} is read-only ({reason}). PEFT Studio does not start "
        "on a history it cannot save to: no project, run, metric or export could be recorded, "
        "and a training would be lost. Make the file and "
        f"its folder writable (e.g. chmod u+w {path}), or copy the projects folder somewhere "
        "writable and point PEFT_STUDIO_HOME at it.")


def _check_writable(write_engine: Engine, path: Path) -> None:
    """Refuse a history that opens but cannot be written, before anyone relies on saving.

    SQLite opens a file it may not write (mode 0444, an immutable file, a read-only mount)
    read-only without a word; BEGIN IMMEDIATE even succeeds in WAL mode. Only a write says
    so: rewriting ``user_version`` with its own value, rolled back, so nothing changes."""
    with write_engine.connect() as conn:  # an error goes to _explain, in open_engine
        trans = conn.begin()
        try:
            _set_user_version(conn, _user_version(conn))
        finally:
            trans.rollback()


def _refuse_empty_file(path: Path) -> None:
    """A 0-byte history is refused before SQLite opens it when that would lose something:
    SQLite deletes a ``-wal`` file found beside a 0-byte database (the only place its data may
    still be), and writes a fresh header into the file."""
    try:
        if path.stat().st_size != 0:
            return
        wal = path.with_name(path.name + "-wal")
        wal_bytes = wal.stat().st_size if wal.exists() else 0
    except OSError:
        return  # SQLite reports what is wrong with it
    folders = _orphaned_folders(path)
    if folders or wal_bytes:
        raise _empty_error(path, folders, wal if wal_bytes else None)


def _empty_error(path: Path, folders: list[str], wal: Path | None = None) -> EmptyDatabaseError:
    shown = ", ".join(folders[:5]) + (f" and {len(folders) - 5} more" if len(folders) > 5 else "")
    beside = [f"project folders ({shown})"] if folders else []
    if wal is not None:
        beside.append(f"its write-ahead log {wal.name}, which may still hold the data")
    return EmptyDatabaseError(
        f"the PEFT Studio history {path} is empty (no history in it: cut short by a crash, a "
        f"full disk or a copy?), but {' and '.join(beside)} lie beside it. Opening it would "
        "start a fresh history that no longer lists them, so PEFT Studio leaves the files as "
        f"they are. Restore {path.name} from a backup; or, to start a fresh history (the "
        f"folders stay on disk, unlisted), move it aside first: mv {path} {path}.empty")


def _orphaned_folders(path: Path) -> list[str]:
    """Project-like folders beside the history file (not reserved, not hidden)."""
    try:
        return sorted(p.name for p in path.parent.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and p.name not in RESERVED_FOLDERS)
    except OSError:
        return []


def _migrate(write_engine: Engine, path: Path, existed: bool = False) -> None:
    with write_engine.connect() as conn:
        with conn.begin():  # IMMEDIATE: two processes starting at once cannot both create
            version = _user_version(conn)
            if version > SCHEMA_VERSION:
                raise NewerSchemaError(
                    f"{path} was written by a newer PEFT Studio (schema {version}); "
                    f"this one understands up to schema {SCHEMA_VERSION}. Upgrade PEFT "
                    "Studio to open it.")
            if version == 0:
                if conn.exec_driver_sql(
                        "SELECT count(*) FROM sqlite_master WHERE type='table'").scalar():
                    raise DatabaseError(f"{path} holds tables but no PEFT Studio "
                                        "schema version; it is not a PEFT Studio history")
                folders = _orphaned_folders(path) if existed else []
                if folders:  # checked under the write lock: no other process is creating it
                    raise _empty_error(path, folders)
                Base.metadata.create_all(conn)
                _set_user_version(conn, SCHEMA_VERSION)
                return
        for step, description, apply in sorted(MIGRATIONS, key=lambda m: m[0]):
            if step <= version or step > SCHEMA_VERSION:
                continue
            with conn.begin():  # a crash or error here rolls back to the previous version
                version = _user_version(conn)  # another process may have just done it
                if version >= step:
                    continue
                if version != step - 1:
                    raise MigrationError(f"{path}: no migration step to schema "
                                         f"{version + 1}")
                try:
                    apply(conn)
                except Exception as err:
                    raise MigrationError(
                        f"upgrading {path} to schema {step} ({description}) failed: "
                        f"{err}; the file is unchanged at schema {version}") from err
                _set_user_version(conn, step)
                version = step
        if version != SCHEMA_VERSION:
            raise MigrationError(f"{path} is at schema {version}, with no migration "
                                 f"step to reach schema {SCHEMA_VERSION}")
