"""The project history: one SQLite file (``projects/studio.db``) shared by the UI and workers.

The only package that imports SQLAlchemy. Every ``Database`` method opens a short session, does
its work and commits, so the UI process and a training worker can use the file at the same
time. Returned ORM objects are plain detached values (``expire_on_commit=False``); change them
through the ``update_*`` methods, not by assigning attributes.

Schema versions live in SQLite's ``PRAGMA user_version``; see ``MIGRATIONS``.

Layout: ``schema`` (the tables, RunStatus and limits), ``engine`` (opening the file, pragmas,
transactions, schema versions and migrations, errors), ``store`` (the ``Database`` class), with
``queue`` (the dispatch queue's atomic claim) and ``bakeoffs`` (bake-off rows) mixed into it.
This module only re-exports their public names.
"""

from __future__ import annotations

from .engine import (MIGRATIONS, SCHEMA_VERSION, DatabaseError, DatabaseLockedError,
                     EmptyDatabaseError, Migration, MigrationError, NewerSchemaError,
                     ReadOnlyDatabaseError)
from .schema import (CANCEL_MODES, FINISHED_STATUSES, NAME_MAX, RESERVED_FOLDERS, Bakeoff, Base,
                     Checkpoint, Dataset, Export, JSONText, Metric, MetricValue, Project, Run,
                     RunStatus, UTCDateTime, utcnow)
from .store import Database

__all__ = [
    "CANCEL_MODES", "FINISHED_STATUSES", "MIGRATIONS", "NAME_MAX", "RESERVED_FOLDERS",
    "SCHEMA_VERSION", "Bakeoff", "Base", "Checkpoint", "Database", "DatabaseError",
    "DatabaseLockedError", "Dataset", "EmptyDatabaseError", "Export", "JSONText", "Metric",
    "MetricValue", "Migration", "MigrationError", "NewerSchemaError", "Project",
    "ReadOnlyDatabaseError", "Run", "RunStatus", "UTCDateTime", "utcnow",
]
