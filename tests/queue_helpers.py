"""Helpers for the queue and bake-off tests (test_dispatch.py, test_bakeoff*.py).

Queued runs are started by other workers, not by the test process, so ``launch._children``
does not know them: ``stop_everything`` cancels what waits and kills, by the pid the history
records, the workers of this test's own (isolated) history.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil

from studio import projects
from studio.db import Database, RunStatus
from studio.runspec import RunSpec
from studio.runs import launch
from worker_helpers import wait_for  # noqa: F401  (the queue tests import it from here)

FAST = dict(method="lora", sample_task="dates", max_steps=2, batch_size=2, max_length=64,
            eval_steps=0, save_steps=0, exact_match_limit=0, learning_rate=1e-2, warmup_ratio=0.0)


def tiny_spec(model: Path, **overrides) -> RunSpec:
    return RunSpec(model=str(model), **{**FAST, **overrides})


def project_id(db: Database, name: str = "queue tests") -> int:
    found = db.get_project_by_name(name) or projects.create_project(db, name)
    return found.id


def new_runs(db: Database, specs: list[RunSpec]) -> list[int]:
    pid = project_id(db)
    return [launch.create_run(db, pid, spec).id for spec in specs]


def status_of(db: Database, run_id: int) -> str:
    return db.get_run(run_id).status


def explain(db: Database, run_id: int) -> str:
    run = db.get_run(run_id)
    return f"run {run_id} {run.status}; error: {run.error}\nlog tail:\n{launch.log_tail(db, run)}"


def stop_everything(db: Database) -> None:
    for run in db.waiting_runs():
        db.cancel_if_waiting(run.id)
    for run in db.runs_with_status(RunStatus.RUNNING.value):
        if run.pid and run.pid != os.getpid():
            try:
                os.killpg(run.pid, signal.SIGKILL)  # each worker leads its own session
            except (ProcessLookupError, PermissionError):
                pass
            try:
                psutil.Process(run.pid).wait(timeout=10)
            except (psutil.NoSuchProcess, psutil.TimeoutExpired):
                pass
