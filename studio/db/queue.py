"""The run queue's queries: enqueue, claim the device atomically, cancel a waiting run.

One device, one training at a time. The "is anything running? then this one runs" decision is
a single BEGIN IMMEDIATE transaction, so two dispatchers (a worker that just finished and a UI
poll, or the UI and the CLI) can never both start a run. Mixed into ``Database``.
"""

from __future__ import annotations

from sqlalchemy import select

from .schema import Run, RunStatus, utcnow


class QueueQueries:
    """Queue methods of ``Database`` (uses its ``session`` / ``_require`` / ``_read``)."""

    def enqueue_runs(self, run_ids: list[int]) -> None:
        """Put queued runs in the dispatch queue, in the order given (queued_at ascending)."""
        with self.session() as s:
            now = utcnow()
            for run_id in run_ids:
                run = self._require(s, Run, run_id)
                if run.status != RunStatus.QUEUED.value:
                    raise ValueError(f"run {run_id} is {run.status}; only a queued run can wait in the queue")
                run.queued_at = now
                # Same-transaction timestamps could tie; the dispatcher breaks ties by id, and
                # callers create runs in the order they want them trained.

    def waiting_runs(self) -> list[Run]:
        """Runs waiting in the dispatch queue, next first."""
        return self._read(select(Run).where(Run.status == RunStatus.QUEUED.value,
                                            Run.queued_at.is_not(None))
                          .order_by(Run.queued_at, Run.id))

    def claim_run(self, run_id: int | None, pid: int) -> tuple[Run | None, Run | None]:
        """If no run is training, mark ``run_id`` (or, for None, the next waiting run) running
        under ``pid`` and return ``(claimed, None)``; otherwise ``(None, the running run)``.
        ``(None, None)``: nothing is running and nothing waits.

        ``pid`` is the claiming process until the worker's own pid replaces it: alive, so a
        concurrent reconcile does not take the claim for a dead worker."""
        with self.session() as s:  # BEGIN IMMEDIATE: the check and the claim are one step
            busy = s.scalars(select(Run).where(Run.status == RunStatus.RUNNING.value)
                             .order_by(Run.id).limit(1)).first()
            if busy is not None:
                return None, busy
            if run_id is None:
                run = s.scalars(select(Run).where(Run.status == RunStatus.QUEUED.value,
                                                  Run.queued_at.is_not(None))
                                .order_by(Run.queued_at, Run.id).limit(1)).first()
                if run is None:
                    return None, None
            else:
                run = self._require(s, Run, run_id)
            now = utcnow()
            run.status, run.pid, run.heartbeat_at, run.started_at = RunStatus.RUNNING.value, pid, now, now
            run.finished_at = run.error = run.exit_code = run.cancel_request = run.activity = None
            return run, None

    def cancel_if_waiting(self, run_id: int) -> bool:
        """Cancel a run that waits in the queue (it has no worker to ask); False if it does not wait."""
        with self.session() as s:
            run = self._require(s, Run, run_id)
            if run.status != RunStatus.QUEUED.value or run.queued_at is None:
                return False
            run.status, run.finished_at = RunStatus.CANCELLED.value, utcnow()
            return True
