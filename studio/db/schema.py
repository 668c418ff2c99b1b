"""The history's tables: the SQLAlchemy models, their column types, RunStatus and the limits.

What a fresh file is created from (``Base.metadata``); changing a model here needs a step in
``engine.MIGRATIONS`` so that existing files follow.
"""

from __future__ import annotations

import enum
import math
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (JSON, CheckConstraint, DateTime, Float, ForeignKey, Index, String, Text,
                        TypeDecorator, UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .. import config

NAME_MAX = 120
RESERVED_FOLDERS = {"models"}  # projects/models holds downloaded base models
CANCEL_MODES = ("save", "discard")


class RunStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    OOM = "oom"


FINISHED_STATUSES = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED,
                               RunStatus.OOM})


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes. SQLite has no time zones: store naive UTC, re-attach UTC on read."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:  # a naive local time would silently shift by the UTC offset
            raise ValueError(f"naive datetime {value!r}: pass an aware one (studio.db.utcnow())")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


class MetricValue(TypeDecorator):
    """A float that survives NaN: SQLite turns NaN into NULL, so read NULL back as NaN.

    A diverging run logs NaN losses; they must be recorded, not rejected."""

    impl = Float
    cache_ok = True

    def process_result_value(self, value: float | None, dialect: Any) -> float:
        return math.nan if value is None else float(value)


JSONText = JSON(none_as_null=True)  # stored as TEXT; None stays SQL NULL, not the string 'null'


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime}

    def to_dict(self) -> dict[str, Any]:
        return {c.key: getattr(self, c.key) for c in self.__table__.columns}


class Project(Base):
    __tablename__ = "projects"
    __table_args__ = (CheckConstraint("length(trim(name)) > 0", name="project_name_not_blank"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    # NOCASE: "Demo" and "demo" side by side in the project list would only confuse.
    name: Mapped[str] = mapped_column(String(NAME_MAX, collation="NOCASE"), unique=True)
    folder: Mapped[str] = mapped_column(String, unique=True)  # set once; see create_project
    model_source: Mapped[str] = mapped_column(String, default=config.DEFAULT_MODEL)
    notes: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


def _project_fk() -> Mapped[int]:
    return mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)


class Dataset(Base):
    __tablename__ = "datasets"
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = _project_fk()
    name: Mapped[str] = mapped_column(String)
    folder: Mapped[str | None] = mapped_column(String)
    source_path: Mapped[str | None] = mapped_column(Text)
    source_hash: Mapped[str | None] = mapped_column(String, index=True)
    format: Mapped[str | None] = mapped_column(String)
    mapping: Mapped[dict | None] = mapped_column(JSONText)
    num_rows: Mapped[int | None]
    num_train: Mapped[int | None]
    num_eval: Mapped[int | None]
    stats: Mapped[dict | None] = mapped_column(JSONText)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = _project_fk()
    dataset_id: Mapped[int | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="SET NULL"), index=True)
    name: Mapped[str] = mapped_column(String)
    method: Mapped[str] = mapped_column(String)
    spec: Mapped[dict] = mapped_column(JSONText)
    status: Mapped[str] = mapped_column(String, default=RunStatus.QUEUED.value, index=True)
    pid: Mapped[int | None]
    exit_code: Mapped[int | None]
    heartbeat_at: Mapped[datetime | None]
    cancel_request: Mapped[str | None] = mapped_column(String)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    notes: Mapped[str] = mapped_column(Text, default="")
    folder: Mapped[str | None] = mapped_column(String)
    # Set when the run joins the dispatch queue (``launch.enqueue``); a run that is only
    # "queued" because it was created and not yet started is never picked by the dispatcher.
    # Last, so that a file migrated with ALTER TABLE ADD COLUMN has the same column order.
    queued_at: Mapped[datetime | None]
    # What the worker is doing between two training steps, written with each heartbeat (schema
    # 3): ``{"phase": "evaluating", "part": "exact match", "done": 12, "total": 50, "step": 20,
    # "since": <unix time>}``; None while it trains steps. The Train tab shows it, so a long
    # evaluation is visibly alive rather than a stalled progress bar.
    activity: Mapped[dict | None] = mapped_column(JSONText)
    # A derived run (schema 4, issue 17): trained adapters composed into a new one, with no
    # worker, metrics or checkpoints of its own; the recipe is ``studio.adapters.compose.Recipe``
    # as a dict (combination, parent run ids and weights, density, svd rank). None: a trained run.
    recipe: Mapped[dict | None] = mapped_column(JSONText)

    @property
    def in_flight(self) -> bool:
        """Training, or waiting in the dispatch queue (a run only created is "queued" too, but
        nothing will start it): what a stop can stop and what must not be deleted or copied
        while its history still grows."""
        return self.status == RunStatus.RUNNING.value or (self.status == RunStatus.QUEUED.value
                                                         and self.queued_at is not None)


class Metric(Base):
    __tablename__ = "metrics"
    __table_args__ = (UniqueConstraint("run_id", "step", "name"),
                      Index("ix_metrics_run_name_step", "run_id", "name", "step"))
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    step: Mapped[int]
    name: Mapped[str] = mapped_column(String)
    value: Mapped[float] = mapped_column(MetricValue, nullable=True)
    wall_time: Mapped[float] = mapped_column(Float)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("run_id", "step"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    step: Mapped[int]
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Export(Base):
    __tablename__ = "exports"
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"),
                                               index=True)
    project_id: Mapped[int] = _project_fk()
    kind: Mapped[str] = mapped_column(String)  # "merged", "adapter", "gguf", ...
    path: Mapped[str] = mapped_column(Text)
    dtype: Mapped[str | None] = mapped_column(String)
    size_bytes: Mapped[int | None]
    status: Mapped[str] = mapped_column(String, default="pending")
    verification: Mapped[dict | None] = mapped_column(JSONText)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Bakeoff(Base):
    """A method bake-off: one run per method under a shared budget, and its saved table.

    ``run_ids`` follows ``methods`` (same order); ``table`` is the last table built from the
    runs' metrics (``studio.bakeoff.table``), kept so the figures stay with the project even if
    a run is deleted later; ``notes`` holds per-run messages (a measurement that failed)."""

    __tablename__ = "bakeoffs"
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = _project_fk()
    dataset_id: Mapped[int | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="SET NULL"), index=True)
    name: Mapped[str] = mapped_column(String)
    model: Mapped[str] = mapped_column(String)
    sample_task: Mapped[str | None] = mapped_column(String)
    methods: Mapped[list] = mapped_column(JSONText)
    budget: Mapped[dict] = mapped_column(JSONText)
    run_ids: Mapped[list] = mapped_column(JSONText)
    table: Mapped[list | None] = mapped_column(JSONText)
    notes: Mapped[dict | None] = mapped_column(JSONText)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
