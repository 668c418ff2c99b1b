"""Faults around a training worker (issue 12, items 4, 5 and 7), each for real: another process
holding SQLite's write lock past the busy timeout, a disk that fills up mid-run (a small tmpfs
mounted over the studio home), and SIGTERM / SIGINT sent to the worker.

Real worker processes on the tiny chat model, watched through the history as the UI does; the
helpers are in worker_helpers.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from studio.db import Database
from studio.runs import launch
from studio.worker import diskspace
from worker_helpers import (explain, folder_of, metrics, new_run, reap_workers,  # noqa: F401
                            tiny_spec, wait_finished, wait_for)

BUSY_TIMEOUT_S = 10  # studio.db's busy_timeout: a write waits this long for a lock, then fails

# Holds the write lock (BEGIN IMMEDIATE), as a long transaction in another program would, until
# told on stdin to let go.
LOCKER = """
import sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=60)
con.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
con.execute("COMMIT")
print("released", flush=True)
"""
LOCKED_NOTE = "the history file is locked: training goes on"


def catches(pid: int, sig: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def loss_lines(db: Database, run) -> int:
    """Training logs the worker printed (one per step): progress that needs no database."""
    log = folder_of(db, run.id) / launch.LOG_NAME
    return sum(1 for line in log.read_text(errors="replace").splitlines() if line.startswith("{'loss'"))


# ------------------------------------------------------------------- item 4: a locked database


def test_a_write_lock_held_past_the_busy_timeout_neither_stops_training_nor_loses_metrics(tiny_chat_model):
    """The lock is taken once the worker has written its start, before its first step, and held
    until the worker's first write has been refused after the busy timeout, and 2 s more. The
    old worker failed there, at its first heartbeat, and could not even record that."""
    from studio.data import import_sample_task

    db = Database()
    steps = 8
    run = new_run(db, tiny_spec(tiny_chat_model, max_steps=steps, save_steps=4, learning_rate=1e-3))
    # The sample task imported beforehand, as a second run in a project finds it: from its
    # start write on, the worker only reads until its first step.
    dataset = import_sample_task(db, run.project_id, "dates").dataset
    db.update_run(run.id, dataset_id=dataset.id)
    started = launch.start(db, run.id)
    worker = launch._children[started.pid]
    wait_for(lambda: db.get_run(run.id).started_at > started.started_at, 90, what="the worker's start write")

    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(db.path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline().strip() == "locked"
        # Hold it until the worker's first write (its heartbeat after step 1) has waited out the
        # busy timeout and been refused, and it has trained on to step 3 or more (or 60 s).
        first_step_at, deadline = None, time.monotonic() + 60
        while time.monotonic() < deadline and worker.poll() is None:
            trained = loss_lines(db, run)
            first_step_at = first_step_at or (time.monotonic() if trained else None)
            if trained >= 3 and first_step_at and time.monotonic() > first_step_at + BUSY_TIMEOUT_S + 2:
                break
            time.sleep(0.2)
        trained_meanwhile = loss_lines(db, run)
        assert worker.poll() is None, explain(db, db.get_run(run.id))
        assert db.get_run(run.id).status == "running"
        assert trained_meanwhile >= 3, f"only {trained_meanwhile} steps trained while the file was locked"
        assert time.monotonic() > first_step_at + BUSY_TIMEOUT_S
        assert db.last_step(run.id) is None  # nothing could be written meanwhile
        assert LOCKED_NOTE in launch.log_tail(db, run, 200)
        released_at = time.time()
        locker.stdin.write("go\n")
        locker.stdin.flush()
        assert locker.stdout.readline().strip() == "released"
    finally:
        locker.kill()
        locker.wait()

    run = wait_finished(db, run.id, timeout=90)
    assert run.status == "completed", explain(db, run)
    m = metrics(db, run.id)
    for name in ("loss", "learning_rate", "tokens_per_s"):  # every step caught up, none lost
        assert sorted(m[name]) == list(range(1, steps + 1)), (name, sorted(m[name]))
    # The steps trained under the lock keep the time they were measured, not written.
    during = [r for r in db.metrics_for(run.id, ["loss"]) if r.wall_time < released_at]
    assert len(during) >= trained_meanwhile
    assert [c.step for c in db.list_checkpoints(run.id)] == [4, 8]
    assert "the history file is writable again" in launch.log_tail(db, run, 200)
    assert db.integrity_check() == "ok"


# ------------------------------------------------------------------------ item 5: a full disk


@pytest.fixture
def small_disk(studio_home):
    """The studio home (history, projects, runs) on a 48 MiB tmpfs: a disk that really fills up.
    Needs root (or CAP_SYS_ADMIN) to mount; skipped elsewhere, saying why."""
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; the full-disk test runs where it can mount")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", "tmpfs", str(studio_home)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield studio_home
    finally:
        subprocess.run(["umount", "-l", str(studio_home)], capture_output=True)


def fill(folder: Path, leave: int) -> Path:
    """Take all free space on ``folder``'s disk but ``leave`` bytes."""
    filler = folder / "filler"
    size = shutil.disk_usage(folder).free - leave
    with open(filler, "wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, size)
    return filler


def test_a_disk_that_fills_up_ends_the_run_failed_disk_full_recorded_and_cleaned(tiny_chat_model, small_disk):
    db = Database()
    run = new_run(db, tiny_spec(tiny_chat_model, max_steps=400, save_steps=10, learning_rate=1e-3))
    launch.start(db, run.id)
    folder = folder_of(db, run.id)
    wait_for(lambda: db.last_step(run.id), 120, what="the first logged step")
    reserved = (folder / diskspace.RESERVE_NAME).is_file()  # claimed before training
    # 1 MiB left: the metrics and log lines fit until the first checkpoint (its tokenizer alone
    # is 2 MiB) fails to.
    filler = fill(small_disk, leave=2**20)

    run = wait_finished(db, run.id, timeout=90)
    assert run.status == "failed", explain(db, run)
    assert run.error.startswith("disk full"), run.error
    assert "A checkpoint of this run needs about" in run.error and "are free now" in run.error, run.error
    assert reserved
    # Every step trained was recorded, up to the one whose checkpoint failed (the first, unless
    # a fast machine saved one before the disk was filled).
    losses = sorted(metrics(db, run.id)["loss"])
    failed_at = losses[-1]
    assert losses == list(range(1, failed_at + 1)) and failed_at % 10 == 0, losses
    assert f"the run stopped at step {failed_at}" in run.error, run.error
    # The half-written checkpoint is gone (not listed, not resumed from), and so is the reserve.
    kept = [c.step for c in db.list_checkpoints(run.id)]
    assert kept == list(range(10, failed_at, 10)), kept
    on_disk = sorted(p.name for p in (folder / "checkpoints").glob("checkpoint-*"))
    assert on_disk == [f"checkpoint-{step}" for step in kept], on_disk
    assert ("Resume: it continues from " + (f"the checkpoint at step {kept[-1]}" if kept else "the start")
            in run.error), run.error
    assert not (folder / diskspace.RESERVE_NAME).exists()
    # With the disk still full, the history reads and the polls work.
    assert db.integrity_check() == "ok"
    assert launch.reconcile(db) == [] and launch.active_run(db) is None
    assert db.get_run(run.id).status == "failed"
    assert launch._children[run.pid].wait(timeout=10) == 1
    # Space freed: the record stays what it was, nothing rewrites the cause.
    filler.unlink()
    assert launch.reconcile(db) == [] and db.get_run(run.id).error == run.error


def test_a_save_that_fails_on_a_full_disk_without_saying_so_is_still_diagnosed(small_disk):
    """torch.save on a full disk says only "unexpected pos ..." (no ENOSPC anywhere in the
    chain): the space left decides. The half-written checkpoint is removed, a complete one and
    what a link points to are kept, and an error that is not about space is left alone."""
    import torch

    checkpoints = small_disk / "run" / "checkpoints"
    (checkpoints / "checkpoint-3").mkdir(parents=True)
    (checkpoints / "checkpoint-3" / "adapter_model.safetensors").write_bytes(b"x" * 1000)
    outside = small_disk / "not-ours"
    outside.mkdir()
    (checkpoints / "checkpoint-7").symlink_to(outside, target_is_directory=True)
    reserve = diskspace.Reserve(small_disk / "run")
    assert reserve.claim()
    assert not diskspace.diagnose(ValueError("a bad value"), small_disk / "run", None, {3}, False)

    fill(small_disk, leave=64 * 2**10)
    assert not diskspace.Reserve(small_disk / "other").claim()  # refused, and nothing left behind
    assert not (small_disk / "other" / diskspace.RESERVE_NAME).exists()
    (checkpoints / "checkpoint-5").mkdir()
    with pytest.raises(RuntimeError) as failed:
        torch.save({"w": torch.zeros(2**20)}, checkpoints / "checkpoint-5" / "optimizer.pt")
    assert "No space left" not in str(failed.value) and not diskspace.says_disk_full(failed.value)

    text = diskspace.diagnose(failed.value, small_disk / "run", None, {3}, False)
    assert text and text.startswith("disk full"), text
    assert "Removed the unfinished" in text and "continues from the checkpoint at step 3" in text, text
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-3"]
    assert outside.is_dir()  # the link was removed, never followed
    free = shutil.disk_usage(small_disk).free
    reserve.release()
    assert shutil.disk_usage(small_disk).free >= free + diskspace.RESERVE_BYTES  # really held


# ------------------------------------------------------------------------ item 7: SIGTERM, SIGINT


def test_sigterm_stops_like_stop_and_save_and_resume_continues_from_that_step(tiny_chat_model):
    db = Database()
    run = new_run(db, tiny_spec(tiny_chat_model, max_steps=400, save_steps=1000, learning_rate=1e-3))
    launch.start(db, run.id)
    seen = wait_for(lambda: (s := db.last_step(run.id) or 0) >= 3 and s, 120, what="three logged steps")
    pid = db.get_run(run.id).pid
    os.kill(pid, signal.SIGTERM)
    run = wait_finished(db, run.id, timeout=60)
    assert run.status == "cancelled", explain(db, run)
    assert launch._children[pid].wait(timeout=10) == 0
    last = max(metrics(db, run.id)["loss"])
    assert seen <= last <= seen + 3, (seen, last)
    [ckpt] = db.list_checkpoints(run.id)
    assert ckpt.step == last
    assert f"Stopped by SIGTERM at step {last}" in run.error, run.error
    assert "not starting the next queued run" in launch.log_tail(db, run)

    # Resume continues from that step, not from step 1. Then SIGINT, again and again while it
    # stops and saves: the later ones are ignored, the checkpoint is whole.
    resumed_at = time.time()
    launch.resume(db, run.id)
    first = wait_for(lambda: min([m.step for m in db.metrics_for(run.id, ["loss"]) if m.wall_time >= resumed_at],
                                 default=None), 120, what="the resumed worker's first step")
    assert first == last + 1, (first, last)
    pid = db.get_run(run.id).pid
    child = launch._children[pid]
    while child.poll() is None:
        os.kill(pid, signal.SIGINT)
        time.sleep(0.02)
    assert child.returncode == 0, launch.log_tail(db, db.get_run(run.id))
    run = db.get_run(run.id)
    assert run.status == "cancelled" and "Stopped by SIGINT" in run.error, explain(db, run)
    latest = db.latest_checkpoint(run.id)
    assert latest.step == max(metrics(db, run.id)["loss"]) > last
    from safetensors.torch import load_file

    assert load_file(str(Path(latest.path) / "adapter_model.safetensors"))
    assert json.loads((Path(latest.path) / "trainer_state.json").read_text())["global_step"] == latest.step
    assert "received again" in launch.log_tail(db, run, 200)


def test_sigterm_while_the_worker_is_still_starting_cancels_the_run(tiny_chat_model):
    """Before the first step there is nothing to save: the run ends cancelled at once (the
    default action would kill the worker and leave the run to be marked failed)."""
    db = Database()
    run = new_run(db, tiny_spec(tiny_chat_model, max_steps=400))
    run = launch.start(db, run.id)
    # As soon as its handler is in (before torch is imported): SigCgt lists the caught signals.
    deadline = time.monotonic() + 10
    while not catches(run.pid, signal.SIGTERM) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(run.pid, signal.SIGTERM)
    assert launch._children[run.pid].wait(timeout=90) == 0
    run = db.get_run(run.id)
    assert run.status == "cancelled", explain(db, run)
    assert "Stopped by SIGTERM before training began" in run.error, run.error
    assert db.last_step(run.id) is None
