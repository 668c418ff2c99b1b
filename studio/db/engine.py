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

from .schema import Base

SCHEMA_VERSION = 2


class DatabaseError(RuntimeError):
    """The history file cannot be used as it is; the message says which file and why."""


class NewerSchemaError(DatabaseError):
    """The file was written by a newer PEFT Studio than this one."""


class MigrationError(DatabaseError):
    """A migration step failed; the file was left at the last version that completed."""


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


MIGRATIONS: list[Migration] = [
    (2, "bake-offs and the run queue", _v2_bakeoffs_and_queue),
]


def _user_version(conn: Connection) -> int:
    return int(conn.exec_driver_sql("PRAGMA user_version").scalar_one())


def _set_user_version(conn: Connection, version: int) -> None:
    conn.exec_driver_sql(f"PRAGMA user_version = {int(version)}")


def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
    # Take BEGIN away from the sqlite3 module (it skips it for DDL, which would make migrations
    # non-atomic); _on_begin emits it instead.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    # First, so that even the pragmas below wait for another process instead of failing.
    cur.execute("PRAGMA busy_timeout=10000")
    # WAL + synchronous=NORMAL: a kill -9 of any process mid-write leaves the file consistent
    # and keeps every committed transaction; only an OS crash or power cut can lose the last
    # few commits (never corrupt the file). Readers never block the writer and vice versa.
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
    disposes the engine and raises a ``DatabaseError`` that names the file."""
    engine = create_engine(URL.create("sqlite", database=str(path)))
    event.listen(engine, "connect", _on_connect)
    event.listen(engine, "begin", _on_begin)
    write_engine = engine.execution_options(studio_begin="IMMEDIATE")
    try:
        _migrate(write_engine, path)
    except DatabaseError:
        engine.dispose()
        raise
    except (exc.DBAPIError, sqlite3.Error) as err:
        engine.dispose()
        reason = getattr(err, "orig", None) or err
        raise DatabaseError(
            f"cannot open the PEFT Studio history {path}: {reason}. If the file is "
            "damaged or not a PEFT Studio database, move it aside: PEFT Studio then starts "
            "a fresh one."
        ) from None
    return engine, write_engine


def _migrate(write_engine: Engine, path: Path) -> None:
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
