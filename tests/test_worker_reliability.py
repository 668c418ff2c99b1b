"""Workers that die: kill -9 mid-run (reconciled, database intact, resumed from the last
checkpoint, five times over), a worker that cannot start, and two runs asking for one device.

Real worker processes on the tiny chat model; the helpers are in worker_helpers.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import psutil
import pytest

from studio.db import Database, utcnow
from studio.runs import launch
from worker_helpers import (explain, metrics, new_run, reap_workers, tiny_spec,  # noqa: F401
                            wait_finished, wait_for)

KILLS = 5


def first_step_logged_since(db: Database, run_id: int, since: float) -> int | None:
    steps = [m.step for m in db.metrics_for(run_id, ["loss"]) if m.wall_time >= since]
    return min(steps) if steps else None


def test_kill_9_mid_run_five_times_is_reconciled_and_resumed(tiny_chat_model):
    db = Database()
    run = new_run(db, tiny_spec(tiny_chat_model, max_steps=400, save_steps=2, batch_size=4,
                                max_length=128, learning_rate=1e-3))
    launch.start(db, run.id)
    checkpoint_at_kill: list[int] = []
    for kill in range(KILLS):
        floor = checkpoint_at_kill[-1] if checkpoint_at_kill else 0
        # At least one checkpoint saved by this worker (a later one than it resumed from).
        wait_for(lambda: (c := db.latest_checkpoint(run.id)) is not None and c.step > floor, 120,
                 what=f"a checkpoint after step {floor} (kill {kill + 1})")
        pid = db.get_run(run.id).pid
        assert pid and psutil.pid_exists(pid)
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()

        def marked_failed():
            launch.reconcile(db)
            return db.get_run(run.id).status == "failed"
        wait_for(marked_failed, 5.0, what=f"reconcile to mark the killed worker (pid {pid}) failed")
        assert time.monotonic() - killed < 5.0
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        failed = db.get_run(run.id)
        assert f"pid {pid}" in failed.error and "exit code -9" in failed.error, failed.error
        assert "last lines of worker.log" in failed.error and "{'loss'" in failed.error, failed.error
        assert failed.exit_code == -9 and failed.finished_at is not None
        assert db.integrity_check() == "ok"

        latest = db.latest_checkpoint(run.id)
        assert latest.step > floor and Path(latest.path).is_dir()
        assert (Path(latest.path) / "adapter_model.safetensors").is_file()
        assert db.last_step(run.id) >= latest.step
        checkpoint_at_kill.append(latest.step)

        resumed_at = time.time()
        launch.resume(db, run.id)
        assert db.get_run(run.id).status == "running"
        first = wait_for(lambda: first_step_logged_since(db, run.id, resumed_at), 120,
                         what=f"the resumed worker's first step (resume {kill + 1})")
        assert first == latest.step + 1, (first, latest.step)

    assert checkpoint_at_kill == sorted(set(checkpoint_at_kill)), checkpoint_at_kill
    # The last resume keeps training; stop it cleanly and look at the whole history.
    launch.stop(db, run.id, "save")
    final = wait_finished(db, run.id, timeout=60)
    assert final.status == "cancelled", explain(db, final)
    losses = metrics(db, run.id)["loss"]
    last = max(losses)
    assert last > checkpoint_at_kill[-1]
    assert sorted(losses) == list(range(1, last + 1))  # no hole anywhere across the kills
    assert db.latest_checkpoint(run.id).step == last
    for ckpt in db.list_checkpoints(run.id):  # every recorded checkpoint is on disk
        assert (Path(ckpt.path) / "adapter_model.safetensors").is_file(), ckpt.step
    assert db.integrity_check() == "ok"


def test_a_worker_that_fails_at_start_ends_failed_with_a_clear_error(tiny_chat_model, tmp_path):
    db = Database()
    missing = tmp_path / "no-such-model"
    run = new_run(db, tiny_spec(missing))
    launch.start(db, run.id)
    run = wait_finished(db, run.id, timeout=90)
    assert run.status == "failed", explain(db, run)
    assert str(missing) in run.error, run.error
    assert run.finished_at is not None
    assert launch.active_run(db) is None


def test_a_worker_that_dies_before_reporting_is_reconciled(tiny_chat_model):
    """A worker that cannot even read its run (here: a spec it does not understand) exits
    without writing its status: reconcile must notice and show why."""
    db = Database()
    run = new_run(db, tiny_spec(tiny_chat_model))
    db.update_run(run.id, spec={**run.spec, "no_such_field": 1})
    launch.start(db, run.id)
    run = wait_finished(db, run.id, timeout=90)
    assert run.status == "failed", explain(db, run)
    assert "exit code 1" in run.error and "no_such_field" in run.error, run.error
    assert run.exit_code == 1


def test_two_runs_cannot_fight_for_the_device(tiny_chat_model):
    db = Database()
    first = new_run(db, tiny_spec(tiny_chat_model, max_steps=400))
    second = new_run(db, tiny_spec(tiny_chat_model))
    first = launch.start(db, first.id)
    try:
        with pytest.raises(launch.RunConflict) as refused:
            launch.start(db, second.id)
        reason = str(refused.value)
        assert f"run {first.id}" in reason and f"pid {first.pid}" in reason and "same device" in reason
        assert db.get_run(second.id).status == "queued" and db.get_run(second.id).pid is None

        # Nor can the same run be started twice (two workers writing one run).
        with pytest.raises(launch.RunConflict):
            launch.start(db, first.id)
        with pytest.raises(launch.RunConflict, match="running"):
            launch.resume(db, first.id)
        assert db.get_run(first.id).pid == first.pid
    finally:
        os.killpg(first.pid, signal.SIGKILL)
    wait_finished(db, first.id, timeout=10)
    assert launch.active_run(db) is None


def test_reconcile_marks_gone_and_silent_workers_failed_and_leaves_live_ones(tiny_chat_model):
    """Runs "running" in the history whose worker is not this process's child (started by the
    CLI or before a UI restart): gone, silent for too long, or alive and well."""
    db = Database()
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # reaped here: for launch it is just a pid that no longer exists
    gone, silent, alive, no_pid = (new_run(db, tiny_spec(tiny_chat_model)) for _ in range(4))
    db.update_run(gone.id, status="running", pid=ended.pid, heartbeat_at=utcnow())
    db.update_run(silent.id, status="running", pid=os.getpid(),
                  heartbeat_at=utcnow() - launch.STALE_HEARTBEAT - timedelta(seconds=5))
    db.update_run(alive.id, status="running", pid=os.getpid(), heartbeat_at=utcnow())
    db.update_run(no_pid.id, status="running", pid=None, heartbeat_at=utcnow())

    assert sorted(launch.reconcile(db)) == sorted([gone.id, silent.id, no_pid.id])
    assert f"pid {ended.pid}" in db.get_run(gone.id).error and "gone" in db.get_run(gone.id).error
    assert "no heartbeat" in db.get_run(silent.id).error
    assert all(db.get_run(r.id).status == "failed" for r in (gone, silent, no_pid))
    assert db.get_run(alive.id).status == "running"
    assert launch.reconcile(db) == []  # idempotent
