"""Aggregate reads for the History tab: per run, each metric's last value and its maximum, and
the number of datasets, runs and exports per project, in a few queries.

Kept apart from ``store`` because they answer one screen's question (a table of many runs) and
must stay fast: reading every metric row of fifty runs through ``metrics_for`` would load
hundreds of thousands of rows to keep a few numbers. Here SQLite does the grouping, walking the
``(run_id, name, step)`` index.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import func, select

from .schema import Dataset, Export, Metric, Run
from .store import Database


@dataclass
class MetricSummary:
    """One run's metrics in brief: name -> (step, value) of the last point, and name -> maximum."""

    last: dict[str, tuple[int, float]] = field(default_factory=dict)
    peak: dict[str, float] = field(default_factory=dict)


def metric_summaries(db: Database, run_ids: Iterable[int]) -> dict[int, MetricSummary]:
    """``{run_id: MetricSummary}`` for every run id given (runs without metrics: empty)."""
    ids = sorted(set(int(i) for i in run_ids))
    out = {i: MetricSummary() for i in ids}
    if not ids:
        return out
    last_step = (select(Metric.run_id, Metric.name, func.max(Metric.step).label("step"))
                 .where(Metric.run_id.in_(ids)).group_by(Metric.run_id, Metric.name).subquery())
    last = (select(Metric.run_id, Metric.name, Metric.step, Metric.value)
            .join(last_step, (Metric.run_id == last_step.c.run_id) & (Metric.name == last_step.c.name)
                  & (Metric.step == last_step.c.step)))
    # MAX ignores NULLs (stored NaNs): the peak is over the finite values only.
    peak = (select(Metric.run_id, Metric.name, func.max(Metric.value))
            .where(Metric.run_id.in_(ids)).group_by(Metric.run_id, Metric.name))
    with db.session(write=False) as s:
        for run_id, name, step, value in s.execute(last):
            out[run_id].last[name] = (int(step), float(value))
        for run_id, name, value in s.execute(peak):
            out[run_id].peak[name] = math.nan if value is None else float(value)
    return out


def project_counts(db: Database) -> dict[int, dict[str, int]]:
    """``{project_id: {"datasets": n, "runs": n, "exports": n}}`` (projects with none: absent)."""
    out: dict[int, dict[str, int]] = {}
    with db.session(write=False) as s:
        for key, model in (("datasets", Dataset), ("runs", Run), ("exports", Export)):
            for project_id, n in s.execute(select(model.project_id, func.count())
                                           .group_by(model.project_id)):
                out.setdefault(project_id, {"datasets": 0, "runs": 0, "exports": 0})[key] = int(n)
    return out
