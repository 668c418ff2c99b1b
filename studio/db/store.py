"""The ``Database`` class: the history's queries, one short session per method.

Every method opens a short session, does its work and commits, so the UI process and a
training worker can use the file at the same time. Returned ORM objects are plain detached
values (``expire_on_commit=False``); change them through the ``update_*`` methods, not by
assigning attributes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, exc, func, select
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker

from .. import config
from .bakeoffs import BakeoffQueries
from .engine import open_engine
from .queue import QueueQueries
from .schema import (CANCEL_MODES, NAME_MAX, RESERVED_FOLDERS, Base, Checkpoint, Dataset, Export,
                     Metric, Project, Run, RunStatus, utcnow)


class Database(QueueQueries, BakeoffQueries):
    """The history file. ``Database()`` opens ``config.db_path()``, upgrading it if needed."""

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else config.db_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.engine, self._write_engine = open_engine(self.path)
        self._writer = sessionmaker(self._write_engine, expire_on_commit=False)
        self._reader = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self, write: bool = True) -> Iterator[Session]:
        """A short transaction: commit on success, roll back on error. Keep it brief."""
        with (self._writer if write else self._reader).begin() as s:
            yield s

    def close(self) -> None:
        self.engine.dispose()

    # ---- small helpers ----
    def _read(self, stmt: Any) -> list[Any]:
        with self.session(write=False) as s:
            return list(s.scalars(stmt))

    def _get(self, model: type[Base], id: int) -> Any:
        with self.session(write=False) as s:
            return s.get(model, id)

    @staticmethod
    def _require(s: Session, model: type[Base], id: int | None) -> Any:
        obj = s.get(model, id) if id is not None else None
        if obj is None:
            raise LookupError(f"no {model.__tablename__[:-1]} with id {id}")
        return obj

    @staticmethod
    def _check_fields(model: type[Base], fields: dict[str, Any]) -> None:
        unknown = set(fields) - (set(model.__table__.columns.keys()) - {"id"})
        if unknown:
            raise TypeError(f"{model.__name__} has no field(s) {sorted(unknown)}")
        for key, value in fields.items():  # fail here, not wrapped deep inside the flush
            if isinstance(value, datetime) and value.tzinfo is None:
                raise ValueError(f"{key}: naive datetime {value!r}; pass an aware one (utcnow())")

    def _update(self, model: type[Base], id: int, fields: dict[str, Any]) -> Any:
        self._check_fields(model, fields)
        with self.session() as s:
            obj = self._require(s, model, id)
            for key, value in fields.items():
                setattr(obj, key, value)
        return obj

    def _pragma(self, name: str) -> list[Any]:
        with self.engine.connect() as conn:
            return [row[0] for row in conn.exec_driver_sql(f"PRAGMA {name}")]

    # ---- projects ----
    @staticmethod
    def _clean_name(name: str) -> str:
        name = (name or "").strip()
        if not name:
            raise ValueError("a project needs a name")
        if len(name) > NAME_MAX:
            raise ValueError(f"project names are at most {NAME_MAX} characters")
        return name

    def _check_name_free(self, s: Session, name: str, except_id: int | None = None) -> None:
        other = s.scalar(select(Project).where(Project.name == name))
        if other is not None and other.id != except_id:
            raise ValueError(f"a project named {other.name!r} already exists")

    def _unique_folder(self, s: Session, name: str) -> str:
        # Folders must not collide with one another, with reserved folders, or with a leftover
        # folder on disk (files of a deleted project that could not be removed).
        base = config.slugify(name)
        taken = set(s.scalars(select(Project.folder)))
        folder, n = base, 1
        while folder in taken or folder in RESERVED_FOLDERS or (self.path.parent / folder).exists():
            n += 1
            folder = f"{base}-{n}"
        return folder

    def create_project(self, name: str, model_source: str = config.DEFAULT_MODEL) -> Project:
        name = self._clean_name(name)
        try:
            with self.session() as s:
                self._check_name_free(s, name)
                project = Project(name=name, folder=self._unique_folder(s, name),
                                  model_source=model_source)
                s.add(project)
        except exc.IntegrityError:  # only if the check above were bypassed
            raise ValueError(f"a project named {name!r} already exists") from None
        return project

    def get_or_create_project(self, name: str,
                              model_source: str = config.DEFAULT_MODEL) -> tuple[Project, bool]:
        """``(project, created)``: the project named ``name``, created if there is none. The
        look-up and the insert are one BEGIN IMMEDIATE transaction, so two processes asking for
        the same new name at once both get the one row (a read-then-create would race)."""
        name = self._clean_name(name)
        with self.session() as s:
            found = s.scalar(select(Project).where(Project.name == name))
            if found is not None:
                return found, False
            project = Project(name=name, folder=self._unique_folder(s, name), model_source=model_source)
            s.add(project)
        return project, True

    def list_projects(self) -> list[Project]:
        return self._read(select(Project).order_by(Project.updated_at.desc(), Project.id.desc()))

    def get_project(self, id: int) -> Project | None:
        return self._get(Project, id)

    def get_project_by_name(self, name: str) -> Project | None:
        with self.session(write=False) as s:
            return s.scalar(select(Project).where(Project.name == (name or "").strip()))

    def rename_project(self, id: int, new_name: str) -> Project:
        """Changes the name only: the folder stays, so paths recorded in runs stay valid."""
        new_name = self._clean_name(new_name)
        with self.session() as s:
            project = self._require(s, Project, id)
            self._check_name_free(s, new_name, except_id=id)
            project.name, project.updated_at = new_name, utcnow()
        return project

    def delete_project(self, id: int) -> str:
        """Deletes the project and (by ON DELETE CASCADE) all its rows; returns its folder name
        so the caller can remove the files."""
        with self.session() as s:
            folder = self._require(s, Project, id).folder
            s.execute(delete(Project).where(Project.id == id))
        return folder

    def touch_project(self, id: int) -> None:
        self._update(Project, id, {"updated_at": utcnow()})

    # ---- datasets ----
    def add_dataset(self, project_id: int, **fields: Any) -> Dataset:
        self._check_fields(Dataset, fields)
        with self.session() as s:
            self._require(s, Project, project_id)
            dataset = Dataset(project_id=project_id, **fields)
            s.add(dataset)
        return dataset

    def list_datasets(self, project_id: int) -> list[Dataset]:
        return self._read(select(Dataset).where(Dataset.project_id == project_id)
                          .order_by(Dataset.created_at, Dataset.id))

    def get_dataset(self, id: int) -> Dataset | None:
        return self._get(Dataset, id)

    def find_dataset_by_hash(self, project_id: int, source_hash: str) -> Dataset | None:
        found = self._read(select(Dataset).where(Dataset.project_id == project_id,
                                                 Dataset.source_hash == source_hash)
                           .order_by(Dataset.id.desc()).limit(1))
        return found[0] if found else None

    # ---- runs ----
    def create_run(self, project_id: int, name: str, method: str, spec: dict,
                   dataset_id: int | None = None, status: str = RunStatus.QUEUED) -> Run:
        with self.session() as s:
            self._require(s, Project, project_id)
            if dataset_id is not None:
                self._require(s, Dataset, dataset_id)
            run = Run(project_id=project_id, name=name, method=method, spec=spec,
                      dataset_id=dataset_id, status=RunStatus(status).value)
            s.add(run)
        return run

    def create_derived_run(self, project_id: int, name: str, method: str, spec: dict,
                           recipe: dict, place: Callable[[int], str]) -> Run:
        """A completed run made without training (a composed adapter, issue 17), recorded in one
        transaction with its files: ``place(run_id)`` puts the run's folder in place and returns
        its name, inside the transaction, so a ``place`` that fails leaves no row. (A commit that
        fails after ``place`` is the caller's to clean up: it knows the folder.)"""
        with self.session() as s:
            self._require(s, Project, project_id)
            now = utcnow()
            run = Run(project_id=project_id, name=name, method=method, spec=spec, recipe=recipe,
                      status=RunStatus.COMPLETED.value, started_at=now, finished_at=now)
            s.add(run)
            s.flush()  # the id names the folder
            run.folder = place(run.id)
        return run

    def get_run(self, id: int) -> Run | None:
        return self._get(Run, id)

    def list_runs(self, project_id: int | None = None) -> list[Run]:
        stmt = select(Run).order_by(Run.created_at.desc(), Run.id.desc())
        if project_id is not None:
            stmt = stmt.where(Run.project_id == project_id)
        return self._read(stmt)

    def update_run(self, id: int, **fields: Any) -> Run:
        if "status" in fields:
            fields["status"] = RunStatus(fields["status"]).value
        if fields.get("cancel_request") not in (None, *CANCEL_MODES):
            raise ValueError(f"cancel_request must be one of {CANCEL_MODES} or None")
        return self._update(Run, id, fields)

    def heartbeat(self, run_id: int, activity: dict[str, Any] | None = None) -> str | None:
        """Stamps the run as alive and records what the worker is doing (``Run.activity``; None:
        training steps); returns its pending cancel request ("save"/"discard"/None) so a worker
        learns about a cancel in the same round trip."""
        with self.session() as s:
            run = self._require(s, Run, run_id)
            run.heartbeat_at, run.activity = utcnow(), activity
            return run.cancel_request

    def request_cancel(self, run_id: int, mode: str) -> Run:
        if mode not in CANCEL_MODES:
            raise ValueError(f"cancel mode must be one of {CANCEL_MODES}, not {mode!r}")
        return self._update(Run, run_id, {"cancel_request": mode})

    def runs_with_status(self, *statuses: str) -> list[Run]:
        values = [RunStatus(s).value for s in statuses]
        return self._read(select(Run).where(Run.status.in_(values))
                          .order_by(Run.created_at, Run.id))

    def delete_run(self, id: int) -> str | None:
        """Deletes the run with its metrics and checkpoints; returns its folder, if any."""
        with self.session() as s:
            folder = self._require(s, Run, id).folder
            s.execute(delete(Run).where(Run.id == id))
        return folder

    # ---- metrics ----
    def log_metrics(self, run_id: int, step: int, values: dict[str, float],
                    wall_time: float | None = None) -> None:
        """Upserts: a resumed run that logs a step again replaces the values, not duplicates."""
        if not values:
            return
        wall = time.time() if wall_time is None else float(wall_time)
        rows = [{"run_id": run_id, "step": int(step), "name": str(k), "value": float(v),
                 "wall_time": wall} for k, v in values.items()]
        stmt = sqlite_insert(Metric).values(rows)
        stmt = stmt.on_conflict_do_update(
            index_elements=["run_id", "step", "name"],
            set_={"value": stmt.excluded.value, "wall_time": stmt.excluded.wall_time})
        try:
            with self.session() as s:
                s.execute(stmt)
        except exc.IntegrityError:  # the foreign key: the run is gone
            raise LookupError(f"no run with id {run_id}") from None

    def metrics_for(self, run_id: int, names: list[str] | None = None,
                    since_step: int | None = None) -> list[Metric]:
        """Metrics ordered by step; ``since_step`` returns only steps after it (for polling)."""
        stmt = select(Metric).where(Metric.run_id == run_id)
        if names is not None:
            stmt = stmt.where(Metric.name.in_(list(names)))
        if since_step is not None:
            stmt = stmt.where(Metric.step > since_step)
        return self._read(stmt.order_by(Metric.step, Metric.name))

    def last_step(self, run_id: int) -> int | None:
        with self.session(write=False) as s:
            return s.scalar(select(func.max(Metric.step)).where(Metric.run_id == run_id))

    # ---- checkpoints ----
    def add_checkpoint(self, run_id: int, step: int, path: str | Path) -> Checkpoint:
        """Records a checkpoint; saving the same step again (after a resume) replaces the path."""
        with self.session() as s:
            self._require(s, Run, run_id)
            ckpt = s.scalar(select(Checkpoint).where(Checkpoint.run_id == run_id,
                                                     Checkpoint.step == step))
            if ckpt is None:
                ckpt = Checkpoint(run_id=run_id, step=int(step))
                s.add(ckpt)
            ckpt.path, ckpt.created_at = str(path), utcnow()
        return ckpt

    def list_checkpoints(self, run_id: int) -> list[Checkpoint]:
        return self._read(select(Checkpoint).where(Checkpoint.run_id == run_id)
                          .order_by(Checkpoint.step))

    def latest_checkpoint(self, run_id: int) -> Checkpoint | None:
        found = self._read(select(Checkpoint).where(Checkpoint.run_id == run_id)
                           .order_by(Checkpoint.step.desc()).limit(1))
        return found[0] if found else None

    def delete_checkpoints(self, run_id: int, ids: list[int] | None = None) -> int:
        """Forget a run's checkpoints, or only those in ``ids`` (after their folders were
        removed); returns how many."""
        query = select(Checkpoint).where(Checkpoint.run_id == run_id)
        if ids is not None:
            query = query.where(Checkpoint.id.in_(ids))
        with self.session() as s:
            rows = s.scalars(query).all()
            for row in rows:
                s.delete(row)
            return len(rows)

    # ---- exports ----
    def add_export(self, project_id: int, kind: str, path: str | Path, **fields: Any) -> Export:
        self._check_fields(Export, fields)
        with self.session() as s:
            self._require(s, Project, project_id)
            export = Export(project_id=project_id, kind=kind, path=str(path), **fields)
            s.add(export)
        return export

    def list_exports(self, project_id: int) -> list[Export]:
        return self._read(select(Export).where(Export.project_id == project_id)
                          .order_by(Export.created_at.desc(), Export.id.desc()))

    def update_export(self, id: int, **fields: Any) -> Export:
        return self._update(Export, id, fields)

    # ---- health ----
    def schema_version(self) -> int:
        return int(self._pragma("user_version")[0])

    def journal_mode(self) -> str:
        return str(self._pragma("journal_mode")[0]).lower()

    def integrity_check(self) -> str:
        """'ok' for a sound file, otherwise SQLite's list of problems, one per line."""
        return "\n".join(str(r) for r in self._pragma("integrity_check"))
