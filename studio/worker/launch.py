"""Starting, stopping, resuming and reconciling worker processes. Used by the UI and the CLI.

One worker process per run: ``python -m studio.worker RUN_ID`` in its own process session (so a
UI restart or Ctrl-C in the UI's terminal does not kill it), output to ``worker.log`` in the run
folder (never an unread pipe, which would block the worker once full). With more than one GPU
visible, the worker is started through ``torchrun`` so that transformers' Trainer runs DDP; FSDP
or DeepSpeed go through the same door by adding their accelerate config to the environment
(``ACCELERATE_CONFIG_FILE``) — the worker itself does not change.

A worker that dies cannot record its own end, so ``reconcile`` (called on every UI poll and at
start-up) marks a "running" run failed when its process is gone or its heartbeat is stale, with
the tail of its log as the error.

One training per machine. A plain ``start`` (the Train tab's Start, ``peft-studio train``) is
refused with ``RunConflict`` while another run trains: the user asked for "now", and a silent
wait behind a long run would surprise more than a clear no. Runs that may wait (a bake-off's)
are put in the queue with ``enqueue``; ``dispatch`` starts the next waiting run when the device
is free. The worker calls ``dispatch`` as it exits, so the queue advances with the UI closed;
``reconcile`` calls it after marking a dead worker failed (a dead worker cannot), and the UI and
the CLI call it when they poll. The claim of the device is one database transaction
(``Database.claim_run``), so two dispatchers never start two runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import psutil

from studio import config
from studio.db import Database, Run, RunStatus, utcnow
from studio.runspec import RunSpec

STALE_HEARTBEAT = timedelta(minutes=10)  # a step on a slow CPU can take minutes
LOG_NAME = "worker.log"
_children: dict[int, subprocess.Popen] = {}  # workers this process started: exit codes


class RunConflict(Exception):
    """A second run asked for a device that another run is training on."""


def runs_root(db: Database, project_id: int) -> Path:
    project = db.get_project(project_id)
    return config.child_path(config.projects_dir(), project.folder) / "runs"


def run_folder(db: Database, run: Run) -> Path:
    return config.child_path(runs_root(db, run.project_id), run.folder)


def create_run(db: Database, project_id: int, spec: RunSpec, name: str | None = None) -> Run:
    """A queued run row, its folder and its runspec.json (nothing started yet)."""
    spec.validate()
    title = (name or f"{spec.method} on {spec.sample_task or f'dataset {spec.dataset_id}'}").strip()
    run = db.create_run(project_id, title, spec.method, spec.to_dict(), dataset_id=spec.dataset_id)
    folder = f"run-{run.id:04d}-{config.slugify(title, 32)}"
    run = db.update_run(run.id, folder=folder)
    path = run_folder(db, run)
    path.mkdir(parents=True, exist_ok=True)
    spec.save(path / "runspec.json")
    return run


def active_run(db: Database) -> Run | None:
    reconcile(db)
    running = db.runs_with_status(RunStatus.RUNNING.value)
    return running[0] if running else None


def _command(run_id: int, resume: bool) -> list[str]:
    gpus = _cuda_device_count()
    args = [str(run_id)] + (["--resume"] if resume else [])
    if gpus > 1:
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}",
                "-m", "studio.worker", *args]
    return [sys.executable, "-m", "studio.worker", *args]


def _cuda_device_count() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    if "torch" in sys.modules:  # a worker starting its successor: ask directly, not via a probe child
        return sys.modules["torch"].cuda.device_count()
    try:
        from studio.sysinfo import probe_accelerators

        return len(probe_accelerators().get("gpus") or [])
    except Exception:
        return 0


def start(db: Database, run_id: int, resume: bool = False) -> Run:
    """Start the worker for ``run_id`` now; refuses while another run trains on this machine."""
    _mark_dead(db)
    run, busy = _claim_and_spawn(db, run_id, resume)
    if run is not None:
        return run
    # busy can be this very run: a second worker would write the same run folder
    raise RunConflict(f"run {busy.id} ('{busy.name}', pid {busy.pid}) is training on this "
                      "machine; two trainings would fight for the same device. Stop it or "
                      "wait for it to finish.")


def enqueue(db: Database, run_ids: list[int]) -> Run | None:
    """Queue created runs (trained in this order, one at a time) and dispatch; returns the run
    started now, if any."""
    db.enqueue_runs(list(run_ids))
    return dispatch(db)


def dispatch(db: Database) -> Run | None:
    """Start the next waiting run if no run is training; returns it (None: busy or nothing waits).

    Safe to call from anywhere at any time: the claim is atomic, so a second caller finds the
    device taken and does nothing."""
    _mark_dead(db)
    if not db.waiting_runs():  # a read: polls must not take the write lock for nothing
        return None
    return _claim_and_spawn(db, None, resume=False)[0]


def _claim_and_spawn(db: Database, run_id: int | None, resume: bool) -> tuple[Run | None, Run | None]:
    """(the run now started, None) or (None, the run that holds the device or None)."""
    claimed, busy = db.claim_run(run_id, os.getpid())
    if claimed is None:
        return None, busy
    folder = run_folder(db, claimed)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / LOG_NAME, "a", encoding="utf-8") as log:
            proc = subprocess.Popen(_command(claimed.id, resume), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except OSError as exc:  # the claim must not outlive a worker that never started
        db.update_run(claimed.id, status=RunStatus.FAILED.value, finished_at=utcnow(),
                      error=f"could not start the worker: {exc}")
        raise
    _children[proc.pid] = proc
    # Only pid and heartbeat: the status was set by the claim, and a worker that already ended
    # (in a few ms, with a bad spec) has written its own status, which must not be overwritten.
    return db.update_run(claimed.id, pid=proc.pid, heartbeat_at=utcnow()), None


def stop(db: Database, run_id: int, mode: str = "save") -> Run:
    """Ask the worker to stop after its current step ("save": keep a checkpoint; "discard").
    A run waiting in the queue has no worker yet: it is cancelled at once."""
    if db.cancel_if_waiting(run_id):
        return db.get_run(run_id)
    return db.request_cancel(run_id, mode)


def resume(db: Database, run_id: int) -> Run:
    run = db.get_run(run_id)
    if run.status not in (RunStatus.FAILED.value, RunStatus.CANCELLED.value, RunStatus.OOM.value):
        raise RunConflict(f"run {run_id} is {run.status}; only failed, cancelled or out-of-memory "
                          "runs can be resumed")
    return start(db, run_id, resume=True)


def log_tail(db: Database, run: Run, lines: int = 40) -> str:
    path = run_folder(db, run) / LOG_NAME
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64_000))
            return "\n".join(fh.read().decode("utf-8", "replace").splitlines()[-lines:])
    except OSError:
        return ""


def _exit_code(pid: int) -> int | None:
    """The worker's exit code if it has ended (reaping our own children), else None."""
    proc = _children.get(pid)
    if proc is not None:
        return proc.poll()
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return -1
        return None
    except psutil.NoSuchProcess:
        return -1  # gone, and not our child: the code is unknown


def reconcile(db: Database) -> list[int]:
    """Mark runs whose worker is gone (or silent too long) as failed; returns their ids.
    After a failure the next waiting run is dispatched: the dead worker could not do it."""
    failed = _mark_dead(db)
    if failed:
        dispatch(db)
    return failed


def _mark_dead(db: Database) -> list[int]:
    failed = []
    for run in db.runs_with_status(RunStatus.RUNNING.value):
        code = _exit_code(run.pid) if run.pid else -1
        stale = run.heartbeat_at is not None and utcnow() - run.heartbeat_at > STALE_HEARTBEAT
        if code is None and not stale:
            continue
        if stale and code is None:
            reason = f"no heartbeat for {STALE_HEARTBEAT}; the worker (pid {run.pid}) seems hung"
        else:
            reason = f"the worker (pid {run.pid}) ended with exit code {code}" if code not in (None, -1) \
                else f"the worker (pid {run.pid}) is gone (killed, or the machine restarted)"
        fresh = db.get_run(run.id)
        if fresh.status != RunStatus.RUNNING.value:
            continue  # it finished and wrote its own status in between
        db.update_run(run.id, status=RunStatus.FAILED.value, finished_at=utcnow(),
                      exit_code=code if code not in (None, -1) else None,
                      error=f"{reason}.\n\n--- last lines of {LOG_NAME} ---\n{log_tail(db, run)}")
        failed.append(run.id)
    return failed
