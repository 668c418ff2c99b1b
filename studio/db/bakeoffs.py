"""Bake-off rows: create, read, list, update, and find the bake-off a run belongs to.

Mixed into ``Database``. What a bake-off is, and how its table is built, is
``studio.bakeoff``; this module only stores it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from .schema import Bakeoff, Dataset, Project, Run, utcnow


class BakeoffQueries:
    """Bake-off methods of ``Database`` (uses its ``session`` / ``_require`` / ``_read``)."""

    def create_bakeoff(self, project_id: int, name: str, model: str, methods: list[str],
                       budget: dict[str, Any], run_ids: list[int], *, sample_task: str | None = None,
                       dataset_id: int | None = None) -> Bakeoff:
        if len(methods) != len(run_ids):
            raise ValueError("a bake-off has one run per method")
        with self.session() as s:
            self._require(s, Project, project_id)
            if dataset_id is not None:
                self._require(s, Dataset, dataset_id)
            row = Bakeoff(project_id=project_id, name=name, model=model, methods=list(methods),
                          budget=dict(budget), run_ids=[int(r) for r in run_ids],
                          sample_task=sample_task, dataset_id=dataset_id, table=[], notes={})
            s.add(row)
        return row

    def get_bakeoff(self, id: int) -> Bakeoff | None:
        return self._get(Bakeoff, id)

    def list_bakeoffs(self, project_id: int) -> list[Bakeoff]:
        return self._read(select(Bakeoff).where(Bakeoff.project_id == project_id)
                          .order_by(Bakeoff.created_at.desc(), Bakeoff.id.desc()))

    def update_bakeoff(self, id: int, **fields: Any) -> Bakeoff:
        return self._update(Bakeoff, id, {**fields, "updated_at": utcnow()})

    def add_bakeoff_note(self, id: int, run_id: int, text: str) -> Bakeoff:
        """Record a message about one run (read-modify-write in one write transaction)."""
        with self.session() as s:
            row = self._require(s, Bakeoff, id)
            row.notes = {**(row.notes or {}), str(run_id): text}  # a new dict: JSON is not mutable-tracked
            row.updated_at = utcnow()
        return row

    def bakeoff_for_run(self, run_id: int) -> Bakeoff | None:
        """The bake-off that ``run_id`` belongs to, or None. A project holds a handful of
        bake-offs, so reading their (short) run id lists beats a join table."""
        with self.session(write=False) as s:
            run = s.get(Run, run_id)
            if run is None:
                return None
            for row in s.scalars(select(Bakeoff).where(Bakeoff.project_id == run.project_id)):
                if run_id in (row.run_ids or []):
                    return row
        return None
