"""Helpers for the training tests (test_worker*.py, test_cli_train.py): tiny run specs, runs
trained in this process or through a real worker process, polling, metrics, and the fixture that
reaps the workers a test leaves behind.

Two ways to train, on purpose: a worker process costs ~7 s of imports before its first step, so
a test that checks what a *method* or the *Trainer wiring* does trains in this process with
``train_here`` (the worker's own ``train.train``, the same code the process runs); only the tests
of the process machinery (start, stop, crash, kill, resume, reconcile, the CLI) start workers.
"""

from __future__ import annotations

import gc
import os
import signal
import time
from pathlib import Path

import pytest

from studio import projects
from studio.db import Database
from studio.runspec import RunSpec
from studio.runs import launch
from studio.worker import train

FAST = dict(method="lora", sample_task="dates", max_steps=4, batch_size=4, max_length=64,
            eval_steps=0, save_steps=0, exact_match_limit=0, learning_rate=1e-2, warmup_ratio=0.0)


def tiny_spec(model: Path, **overrides) -> RunSpec:
    return RunSpec(model=str(model), **{**FAST, **overrides})


def new_run(db: Database, spec: RunSpec, project: str = "worker tests"):
    found = db.get_project_by_name(project) or projects.create_project(db, project)
    return launch.create_run(db, found.id, spec)


def train_here(db: Database, spec: RunSpec, callbacks: tuple = ()):
    """Train a new run in this process, exactly as the worker's main does; returns the run row."""
    run = new_run(db, spec)
    train.train(db, run.id, extra_callbacks=callbacks)
    gc.collect()  # the Trainer, model and callbacks form cycles: free them before the next test
    return db.get_run(run.id)


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_finished(db: Database, run_id: int, timeout: float = 180.0):
    """Poll like the UI does (reconcile + status) until the run is no longer running."""
    def finished():
        launch.reconcile(db)
        run = db.get_run(run_id)
        return run if run.status != "running" else None
    try:
        return wait_for(finished, timeout, interval=0.2, what=f"run {run_id} to finish")
    except AssertionError:
        run = db.get_run(run_id)
        raise AssertionError(f"run {run_id} still {run.status} after {timeout} s; log tail:\n"
                             f"{launch.log_tail(db, run)}") from None


def run_through_worker(db: Database, spec: RunSpec, timeout: float = 180.0):
    run = new_run(db, spec)
    launch.start(db, run.id)
    return wait_finished(db, run.id, timeout)


def metrics(db: Database, run_id: int) -> dict[str, dict[int, float]]:
    """{name: {step: value}}."""
    out: dict[str, dict[int, float]] = {}
    for m in db.metrics_for(run_id):
        out.setdefault(m.name, {})[m.step] = m.value
    return out


def folder_of(db: Database, run_id: int) -> Path:
    return launch.run_folder(db, db.get_run(run_id))


def explain(db: Database, run) -> str:
    return f"status {run.status}; error: {run.error}\nlog tail:\n{launch.log_tail(db, run)}"


@pytest.fixture(autouse=True)
def reap_workers():
    """Kill the workers this test started that are still alive (a failed assertion must not
    leave a training process behind). Only our own children, by pid."""
    before = set(launch._children)
    yield
    for pid in set(launch._children) - before:
        proc = launch._children[pid]
        if proc.poll() is None:
            os.killpg(pid, signal.SIGKILL)  # the worker leads its own session
            proc.wait(timeout=10)
