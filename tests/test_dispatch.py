"""The run queue: atomic claims, dispatch order, the worker starting its successor, recovery
after a crash, cancelling a waiting run, and a plain Start still refused while a run trains.

The database-only tests take milliseconds; the worker tests train the tiny chat model for two
steps per run (a worker costs ~7 s of imports).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from queue_helpers import (explain, new_runs, project_id, status_of, tiny_spec,
                           wait_for)
from studio.db import Database, RunStatus
from studio.runspec import RunSpec
from studio.runs import launch

SPEC = RunSpec(sample_task="dates").to_dict()


def _rows(db: Database, count: int) -> list[int]:
    pid = project_id(db)
    return [db.create_run(pid, f"r{i}", "lora", SPEC).id for i in range(count)]


# ------------------------------------------------------------------ database only (fast)


def test_claims_follow_queue_order_one_at_a_time(db):
    plain, first, second = _rows(db, 3)
    db.enqueue_runs([first, second])
    assert [r.id for r in db.waiting_runs()] == [first, second]

    claimed, busy = db.claim_run(None, os.getpid())
    assert claimed.id == first and busy is None  # the plain created run is never dispatched
    assert status_of(db, first) == "running" and db.get_run(first).pid == os.getpid()
    claimed, busy = db.claim_run(None, os.getpid())
    assert claimed is None and busy.id == first
    claimed, busy = db.claim_run(plain, os.getpid())  # a named start is refused too
    assert claimed is None and busy.id == first

    db.update_run(first, status="completed")
    assert db.claim_run(None, os.getpid())[0].id == second
    db.update_run(second, status="failed")
    assert db.claim_run(None, os.getpid()) == (None, None)
    assert status_of(db, plain) == "queued"


def test_enqueue_refuses_a_run_that_is_not_queued(db):
    (run,) = _rows(db, 1)
    db.update_run(run, status="completed")
    with pytest.raises(ValueError, match="completed"):
        db.enqueue_runs([run])


def test_a_waiting_run_is_cancelled_at_once_and_skipped(db):
    first, second, third = _rows(db, 3)
    db.enqueue_runs([first, second, third])
    launch.stop(db, second)
    assert status_of(db, second) == "cancelled" and db.get_run(second).finished_at is not None
    assert [r.id for r in db.waiting_runs()] == [first, third]
    assert db.cancel_if_waiting(second) is False


def test_concurrent_claims_from_many_processes_start_exactly_one(db, tmp_path):
    """Four processes claim at the same instant (a barrier file): exactly one wins."""
    runs = _rows(db, 4)
    db.enqueue_runs(runs)
    go = tmp_path / "go"
    script = textwrap.dedent(f"""
        import os, time
        from pathlib import Path
        from studio.db import Database
        db = Database()
        while not Path({str(go)!r}).exists():
            time.sleep(0.001)
        claimed, busy = db.claim_run(None, os.getpid())
        print("won" if claimed else "busy")
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    go.touch()
    results = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert results == ["busy", "busy", "busy", "won"]
    assert len(db.runs_with_status("running")) == 1
    for run in db.runs_with_status("running"):  # the winner's pid is gone: reset before teardown
        db.update_run(run.id, status="cancelled", pid=None)


# ------------------------------------------------------------------------ real workers


def test_the_worker_starts_the_next_run_itself(db, tiny_chat_model):
    """Nothing polls here (no reconcile, no dispatch from the test): as in a closed UI, the
    finishing worker starts the next waiting run."""
    first, second = new_runs(db, [tiny_spec(tiny_chat_model) for _ in range(2)])
    started = launch.enqueue(db, [first, second])
    assert started.id == first and status_of(db, second) == "queued"

    wait_for(lambda: all(status_of(db, r) not in ("queued", "running") for r in (first, second)), 180,
             what="the queue to drain")
    for run_id in (first, second):
        assert status_of(db, run_id) == "completed", explain(db, run_id)
    runs = [db.get_run(r) for r in (first, second)]
    assert runs[0].finished_at <= runs[1].started_at and runs[0].pid != runs[1].pid
    assert f"started queued run {second}" in launch.log_tail(db, runs[0])


def test_a_plain_start_is_refused_while_a_queued_run_trains(db, tiny_chat_model):
    queued, plain = new_runs(db, [tiny_spec(tiny_chat_model, max_steps=400), tiny_spec(tiny_chat_model)])
    running = launch.enqueue(db, [queued])
    with pytest.raises(launch.RunConflict, match=f"run {queued} .*same device"):
        launch.start(db, plain)
    assert status_of(db, plain) == "queued" and db.get_run(plain).queued_at is None
    assert running.pid and running.pid != os.getpid()


def test_the_queue_goes_on_after_a_crash_and_after_a_stop(db, tiny_chat_model):
    """Run 1 is killed -9: the reconcile that notices starts run 2. Run 2 is stopped: its worker
    ends it as cancelled and starts run 3, which completes."""
    long = tiny_spec(tiny_chat_model, max_steps=400)
    first, second, third = new_runs(db, [long, long, tiny_spec(tiny_chat_model)])
    running = launch.enqueue(db, [first, second, third])
    wait_for(lambda: db.last_step(first), 120, what="the first training step")
    os.killpg(running.pid, signal.SIGKILL)
    wait_for(lambda: launch.reconcile(db) or status_of(db, first) == "failed", 30,
             what="reconcile to notice the dead worker")
    assert status_of(db, first) == "failed" and "pid" in db.get_run(first).error
    assert status_of(db, second) == "running"  # dispatched by that reconcile

    wait_for(lambda: db.last_step(second), 120, what="the second run's first step")
    launch.stop(db, second, "discard")
    wait_for(lambda: status_of(db, third) not in ("queued", "running"), 150, what="the third run")
    assert status_of(db, second) == RunStatus.CANCELLED.value
    assert status_of(db, third) == "completed", explain(db, third)
