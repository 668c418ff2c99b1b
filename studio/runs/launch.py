"""Starting, stopping, resuming and reconciling worker processes. Used by the UI and the CLI.

One worker process per run: ``python -m studio.worker RUN_ID`` in its own process session (so a
UI restart or Ctrl-C in the UI's terminal does not kill it), output to ``worker.log`` in the run
folder (never an unread pipe, which would block the worker once full). A run of several processes
(``RunSpec.nproc_per_node``, or automatically one per GPU when several are visible) starts under
``torchrun`` so that transformers' Trainer runs DDP (``multiprocess.py``); FSDP and DeepSpeed
start under ``accelerate launch`` with the config ``studio.distributed.strategy`` writes into the
run folder — the worker itself is the same.

A worker that dies cannot record its own end, so ``reconcile`` (called on every UI poll and at
start-up) marks a "running" run failed when its process is gone, with the tail of its log as the
error. A run is never marked failed while its worker lives: one that is alive but silent for
``STALE_HEARTBEAT`` (the hang timeout: no step, evaluation batch, generated token or checkpoint
in that time) is killed first (``liveness.py``), and a Resume is refused while a worker of the
run is still alive, so one run never has two workers.

One training per machine. A plain ``start`` (the Train tab's Start, ``peft-studio train``) is
refused with ``RunConflict`` while another run trains: the user asked for "now", and a silent
wait behind a long run would surprise more than a clear no. Runs that may wait (a bake-off's)
are put in the queue with ``enqueue``; ``dispatch`` starts the next waiting run when the device
is free. The worker calls ``dispatch`` as it exits, so the queue advances with the UI closed;
``reconcile`` calls it after marking a dead worker failed (a dead worker cannot), and the UI and
the CLI call it when they poll. The claim of the device is one database transaction
(``Database.claim_run``), so two dispatchers never start two runs.

Polls must survive anything one run row can do to them: ``reconcile`` and ``dispatch`` run at
every UI poll, at start-up and in every ``peft-studio train``, so a row whose folder is a link
out of ``runs/`` (or a changed value), or a history that cannot be written just now (locked,
read-only, disk full), costs that row a log line and a retry at the next poll, never the caller.
A finished worker is reaped at the next poll, whether or not anyone looks at its run.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from studio import config
from studio.db import Database, Run, RunStatus, utcnow
from studio.runs import children, liveness, multiprocess
from studio.runspec import RunSpec, RunSpecError

log = logging.getLogger(__name__)
# The hang timeout. The worker beats at every sign of progress (see studio.worker.trainer), so
# only one training step (forward and backward of one micro-batch) must fit in it.
STALE_HEARTBEAT = timedelta(minutes=10)
LOG_NAME = "worker.log"
_children = children.processes  # workers this process started and has not reaped (tests read it)
_logged: set[str] = set()  # poll faults already logged (a poll runs every second)


class RunConflict(Exception):
    """A second run asked for a device that another run is training on."""


class RunFolderError(RunConflict, ValueError):
    """A run's recorded folder is not a folder inside its project's ``runs/`` (a link out of it,
    or a changed, absolute or empty value): nothing is read, written or started there. A
    ``RunConflict`` so that every caller that shows a refused start shows this one; a
    ``ValueError`` as ``config.child_path``'s refusal was before."""


def runs_root(db: Database, project_id: int) -> Path:
    project = db.get_project(project_id)
    if project is None:
        raise LookupError(f"no project with id {project_id}")
    return config.child_path(config.projects_dir(), project.folder) / "runs"


def run_folder(db: Database, run: Run) -> Path:
    """The run's folder, only if it lies inside its project's ``runs/`` (links resolved)."""
    try:
        root = runs_root(db, run.project_id)
        return config.child_path(root, run.folder or "")
    except ValueError as exc:
        raise RunFolderError(f"run {run.id}'s folder {run.folder!r} is not a folder inside its "
                             f"project's runs folder ({_why_outside(db, run, exc)}); PEFT Studio "
                             "neither reads, writes nor starts anything there.") from None


def _why_outside(db: Database, run: Run, exc: ValueError) -> str:
    try:
        link = runs_root(db, run.project_id) / (run.folder or "")
        if run.folder and link.is_symlink():
            return f"it is a link to {os.readlink(link)}"
    except (ValueError, OSError):
        pass
    return str(exc)


def _check_dataset(db: Database, project_id: int, spec: RunSpec) -> None:
    """A dataset id names a dataset of this project, or the run is refused before any row or
    folder exists (an id too large for SQLite would otherwise end in a traceback)."""
    value = spec.dataset_id
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**63:
        raise RunSpecError(f"dataset_id: expected the id of an imported dataset (a whole number "
                           f"from 1), got {value!r}")
    dataset = db.get_dataset(value)
    if dataset is None or dataset.project_id != project_id:
        project = db.get_project(project_id)
        where = f"project '{project.name}'" if project else f"project {project_id}"
        raise RunSpecError(f"dataset_id: {where} has no dataset with id {value}; pick one of "
                           "its imported datasets (the Data tab lists them)")


def create_run(db: Database, project_id: int, spec: RunSpec, name: str | None = None) -> Run:
    """A queued run row, its folder and its runspec.json (nothing started yet). A spec or a
    folder that cannot be used leaves nothing behind: no row, no folder."""
    spec.validate()
    _check_dataset(db, project_id, spec)
    if spec.nproc_per_node > 1 and (why := multiprocess.gpu_refusal(spec, _cuda_device_count())):
        raise RunSpecError(why)
    if spec.distributed != "ddp":  # FSDP / ZeRO on this machine: ZeRO needs deepspeed, both need CUDA
        from studio.distributed.strategy import refusal

        gpus = _cuda_device_count()
        if why := refusal(spec, "cuda" if gpus else "cpu", multiprocess.process_count(spec, gpus)):
            raise RunSpecError(why)
    runs_root(db, project_id)  # a project folder that is not ours is refused before any row
    title = (name or f"{spec.method} on {spec.sample_task or f'dataset {spec.dataset_id}'}").strip()
    run = db.create_run(project_id, title, spec.method, spec.to_dict(), dataset_id=spec.dataset_id)
    made = None  # the folder, once this call has created it (a folder found there is not ours)
    try:
        folder = folder_name(run.id, title)
        run = db.update_run(run.id, folder=folder)
        path = run_folder(db, run)
        if not path.exists():
            path.mkdir(parents=True)
            made = path
        spec.save(path / "runspec.json")
    except BaseException:
        _forget_new_run(db, run.id, made)
        raise
    return run


def folder_name(run_id: int, title: str) -> str:
    """A run's folder inside its project's ``runs/``: its id, then its title as a short slug."""
    return f"run-{run_id:04d}-{config.slugify(title, 32)}"


def _forget_new_run(db: Database, run_id: int, made: Path | None) -> None:
    import shutil

    try:
        db.delete_run(run_id)
    except Exception as exc:  # the original error is the one to report
        log.warning("could not remove run %s after a failed create: %s", run_id, exc)
    if made is not None:
        shutil.rmtree(made, ignore_errors=True)


def active_run(db: Database) -> Run | None:
    reconcile(db)  # never raises: a fault is logged and the read below still answers
    running = db.runs_with_status(RunStatus.RUNNING.value)
    return running[0] if running else None


def _command(run: Run, folder: Path, resume: bool) -> list[str]:
    """How run ``run`` starts: one process, torchrun for DDP, accelerate for FSDP / ZeRO."""
    args = [str(run.id)] + (["--resume"] if resume else [])
    try:
        spec = RunSpec.from_dict(run.spec or {})
    except (RunSpecError, TypeError):  # one process, which records why the spec cannot train
        return [sys.executable, "-m", "studio.worker", *args]
    if spec.distributed != "ddp":
        from studio.distributed.strategy import launch_command

        return launch_command(spec, folder, run.id, resume)
    processes = multiprocess.process_count(spec, _cuda_device_count())
    if processes > 1:
        return multiprocess.torchrun_command(processes, run.id, resume)
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
    """Start the worker for ``run_id`` now; refuses while another run trains on this machine,
    and (``RunFolderError``) when the run's folder is not inside its runs folder: checked
    before the claim, so a refused run is never left "running" under this process."""
    _mark_dead(db)
    run = db.get_run(run_id)
    if run is None:
        raise LookupError(f"no run with id {run_id}")
    run_folder(db, run)
    old = liveness.worker_process(run.pid, run.id) if run.status != RunStatus.RUNNING.value else None
    if old is not None and not liveness.wait_gone(old, _children.get(run.pid)):
        # Not a worker that wrote its end and is exiting, but a row marked failed or cancelled
        # (by an older version, or by hand) while its worker went on: a second worker would
        # write the same run folder.
        raise RunConflict(f"run {run.id}'s worker (pid {run.pid}) is still running although the run "
                          f"is marked {run.status}; wait for it to end, or end it (kill {run.pid}), "
                          "before starting the run again.")
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

    Safe to call from anywhere at any time, and it never raises: the claim is atomic, so a
    second caller finds the device taken and does nothing; a waiting run that cannot be
    started is marked failed and the next one tried; a history that cannot be written now is
    logged and tried again at the next call."""
    _mark_dead(db)
    try:
        if not db.waiting_runs():  # a read: polls must not take the write lock for nothing
            return None
        for _ in range(len(db.waiting_runs())):
            try:
                return _claim_and_spawn(db, None, resume=False)[0]
            except RunFolderError as exc:  # that row only, marked failed: the next may start
                _log_once(f"dispatch: {exc}")
    except Exception as exc:  # locked, read-only, disk full: the next poll tries again
        _log_once(f"dispatch: {type(exc).__name__}: {exc}", exc)
    return None


def _log_once(message: str, exc: BaseException | None = None) -> None:
    """Log a poll's fault once, not every second while it lasts."""
    if message in _logged:
        return
    if len(_logged) > 1000:
        _logged.clear()
    _logged.add(message)
    log.warning("%s", message, exc_info=exc)


def _claim_and_spawn(db: Database, run_id: int | None, resume: bool) -> tuple[Run | None, Run | None]:
    """(the run now started, None) or (None, the run that holds the device or None)."""
    claimed, busy = db.claim_run(run_id, os.getpid())
    if claimed is None:
        return None, busy
    try:  # the claim must not outlive a worker that never started
        folder = run_folder(db, claimed)
        folder.mkdir(parents=True, exist_ok=True)
        command = _command(claimed, folder, resume)
        with open(folder / LOG_NAME, "a", encoding="utf-8") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    env=multiprocess.environment(multiprocess.ranks_in(command)))
    except BaseException as exc:
        error = str(exc) if isinstance(exc, RunFolderError) else f"could not start the worker: {exc}"
        try:
            db.update_run(claimed.id, status=RunStatus.FAILED.value, finished_at=utcnow(), error=error)
        except Exception as undo:  # the claim then goes stale (our pid's heartbeat stops)
            log.warning("could not mark run %s failed: %s", claimed.id, undo)
        raise
    children.remember(proc, claimed.id)
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
    if run.recipe is not None:  # a composed adapter (studio.adapters.compose): never trained
        raise RunConflict(f"run {run_id} ('{run.name}') is a composed adapter, made from other "
                          "runs' adapters without training: there is no training to resume")
    if run.status not in (RunStatus.FAILED.value, RunStatus.CANCELLED.value, RunStatus.OOM.value):
        raise RunConflict(f"run {run_id} is {run.status}; only failed, cancelled or out-of-memory "
                          "runs can be resumed")
    return start(db, run_id, resume=True)


def log_tail(db: Database, run: Run, lines: int = 40) -> str:
    """The last lines of the run's log ("" when there is none); ``RunFolderError`` when the
    run's folder is not inside its runs folder (nothing is read through a link out of it)."""
    path = run_folder(db, run) / LOG_NAME
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64_000))
            return "\n".join(fh.read().decode("utf-8", "replace").splitlines()[-lines:])
    except OSError:
        return ""


def reconcile(db: Database) -> list[int]:
    """Mark runs whose worker is gone (or silent too long) as failed; returns their ids.
    After a failure the next waiting run is dispatched: the dead worker could not do it.
    Never raises (see the module's docstring): a row that cannot be handled is logged and
    retried at the next call."""
    failed = _mark_dead(db)
    if failed:
        dispatch(db)
    return failed


def _mark_dead(db: Database) -> list[int]:
    children.reap()
    try:
        running = db.runs_with_status(RunStatus.RUNNING.value)
    except Exception as exc:  # an unreadable history: the caller's own reads will say so
        _log_once(f"reconcile: cannot list running runs: {type(exc).__name__}: {exc}", exc)
        return []
    failed = []
    for run in running:
        try:
            if _mark_if_dead(db, run):
                failed.append(run.id)
        except Exception as exc:  # one row (a bad folder, a locked or full disk) never stops the rest
            _log_once(f"reconcile: run {run.id}: {type(exc).__name__}: {exc}", exc)
    return failed


def _mark_if_dead(db: Database, run: Run) -> bool:
    code = children.exit_code(run.pid, run.id) if run.pid else -1
    stale = run.heartbeat_at is not None and utcnow() - run.heartbeat_at > STALE_HEARTBEAT
    if code is None and not stale:
        return False
    if stale and code is None:
        fresh = db.get_run(run.id)  # its last beat may have landed since the list was read
        if fresh.status != RunStatus.RUNNING.value or utcnow() - fresh.heartbeat_at <= STALE_HEARTBEAT:
            return False
        reason, code = _end_hung(run)
    else:
        reason = f"the worker (pid {run.pid}) ended with exit code {code}" if code not in (None, -1) \
            else f"the worker (pid {run.pid}) is gone (killed, or the machine restarted)"
        # Ranks that outlived their launcher (each in its own session) go first; torchrun's report
        # in the log names the rank that failed first.
        reason += multiprocess.outlived(liveness.kill_run(run.id), lambda: log_tail(db, run, 400))
    fresh = db.get_run(run.id)
    if fresh.status != RunStatus.RUNNING.value:
        return False  # it finished and wrote its own status in between
    try:
        tail = f"--- last lines of {LOG_NAME} ---\n{log_tail(db, run)}"
    except RunFolderError as exc:  # the row is still failed: with why its log was not read
        tail = str(exc)
    db.update_run(run.id, status=RunStatus.FAILED.value, finished_at=utcnow(),
                  exit_code=code if code not in (None, -1) else None, error=f"{reason}.\n\n{tail}")
    return True


def _end_hung(run: Run) -> tuple[str, int | None]:
    """A worker alive but silent for the hang timeout: kill it, so that no worker trains on
    beside a failed row. Returns (the reason to record, its exit code or -1)."""
    silent = f"no heartbeat for {STALE_HEARTBEAT} (no training step, evaluation batch, generated token or checkpoint)"
    process = liveness.worker_process(run.pid, run.id)
    if process is None:  # the pid now belongs to another program: the worker is long gone
        return f"{silent}, and pid {run.pid} is no longer a PEFT Studio worker of this run", -1
    code = liveness.kill_worker(process, run.id, _children.get(run.pid))  # TimeoutError: next poll
    children.reap()
    return (f"{silent}: the worker (pid {run.pid}) was hung and has been killed; Resume continues from "
            "the latest checkpoint"), (-1 if code is None else code)
