"""Starting a new run: the one door used by the Train tab's Start and ``peft-studio train``.

Every check that needs no run row happens before one exists (``check_new_run``): the RunSpec
is valid, its model source and sample task exist, its dataset belongs to the project, no run is
training on this machine, and on a GPU the memory estimate does not exceed the free memory
(the same RunSpec → training setup translation the worker uses, ``studio.run_setup``). On the
CPU the estimate is only advice: RAM swaps rather than crashing, so nothing is refused there.

Only then are the run's row and folder made and the worker started (``launch``). What can still
go wrong after that — another start claiming the device in between (the claim is atomic,
``launch.start`` refuses ours with ``RunConflict``), a worker that cannot be started, a full
disk — deletes the row and the files this start wrote (``_forget``) before the refusal is
raised, so a refused start never leaves an orphan queued run behind.

A refusal is ``StartRefused``, whose text is the one line the user reads.
"""

from __future__ import annotations

import os
from pathlib import Path

from studio import config, errors
from studio.db import Database, Run, RunStatus
from studio.runs import launch
from studio.run_setup import DeviceFacts
from studio.runspec import RunSpec, RunSpecError

GIB = 2**30


class StartRefused(Exception):
    """A run that must not start; ``str(exc)`` is the user-facing reason, one line. Nothing
    was created (or what was created is gone again)."""


class StartedThenInterrupted(KeyboardInterrupt):
    """Ctrl-C came just after the worker started: the run trains on without its caller."""

    def __init__(self, run: Run) -> None:
        super().__init__(run.id)
        self.run = run


def busy_reason(busy: Run) -> str:
    return (f"run {busy.id} ('{busy.name}', pid {busy.pid}) is training on this machine; two "
            f"trainings would fight for the same device. Wait for it to finish or stop it (the "
            f"Train tab's Stop, or `peft-studio stop {busy.id}`). Nothing was created.")


def check_new_run(db: Database, spec: RunSpec, project_id: int | None, *,
                  device: DeviceFacts | None = None) -> None:
    """Raise ``StartRefused`` if ``spec`` must not start in project ``project_id`` (None: a
    project that does not exist yet, so it has no datasets) on this machine. ``device``: the
    device facts (``run_setup.device_facts``) to check the memory against; None reads them."""
    try:
        spec.validate()
    except (RunSpecError, ValueError, TypeError) as exc:
        raise StartRefused(str(exc)) from None
    _check_model(spec)
    _check_data(db, spec, project_id)
    busy = launch.active_run(db)
    if busy is not None:
        raise StartRefused(busy_reason(busy))
    _check_memory(spec, device)


def _check_model(spec: RunSpec) -> None:
    from studio.models import ModelSourceError, parse_source

    try:
        source = parse_source(spec.model)
    except ModelSourceError as exc:
        raise StartRefused(f"runspec 'model': {exc}") from None
    if source.kind == "folder" and not (Path(source.ref) / "config.json").is_file():
        raise StartRefused(f"runspec 'model': {source.ref} has no config.json: not a Hugging Face "
                           "model folder")


def _check_data(db: Database, spec: RunSpec, project_id: int | None) -> None:
    if spec.sample_task is not None:
        from studio.samples import get_task

        try:
            get_task(spec.sample_task)
        except KeyError as exc:
            raise StartRefused(f"runspec 'sample_task': {exc.args[0]}") from None
    if spec.dataset_id is None:
        return
    project = db.get_project(project_id) if project_id is not None else None
    dataset = db.get_dataset(spec.dataset_id)  # validated: an id SQLite can hold
    if project is None or dataset is None or dataset.project_id != project.id:
        where = f"project '{project.name}'" if project is not None else "a new project"
        raise StartRefused(f"runspec 'dataset_id': {where} has no dataset {spec.dataset_id}; import "
                           "it there first (the Data tab) or use a sample task")


def _check_memory(spec: RunSpec, device: DeviceFacts | None) -> None:
    """Refuse a precision the device cannot train in, and on a GPU a run whose estimated
    training memory exceeds the free memory. The estimate is the planner's for the setup the
    worker will really use (``run_setup.training_setup``)."""
    from studio import planner, run_setup

    if device is None:
        device = run_setup.device_facts(spec.model)
    try:
        choice = run_setup.training_setup(spec, device)
    except run_setup.SetupError as exc:  # fp16 or liger_kernel without a GPU
        raise StartRefused(f"{exc}. Nothing was created.") from None
    if device.free_bytes is None:  # the CPU: the estimate is shown, never enforced
        return
    try:
        result = planner.plan(planner.arch_for(spec.model), spec.method, spec.method_settings,
                              choice.setup, device.free_bytes)
    except Exception:  # no estimate (an unreadable model): the worker fails with its log
        return
    if result["verdict"] == "exceeds":
        raise StartRefused(
            f"it would not fit: {result['title']} needs about {result['total_bytes'] / GIB:.2f} GiB "
            f"of training memory (batch {spec.batch_size} × {spec.max_length} tokens, "
            f"{choice.precision}) and the GPU has {device.free_bytes / GIB:.1f} GiB free. Lower the "
            "batch size or max length, turn on gradient checkpointing, or pick QLoRA. Nothing was "
            "created.")


def start_new_run(db: Database, project_id: int, spec: RunSpec, *, name: str | None = None,
                  device: DeviceFacts | None = None) -> Run:
    """Check, create and start a run of ``spec`` in project ``project_id``; the started run.
    ``StartRefused`` when it must not start: then no row and no folder of it are left.
    ``device``: the device facts to check the memory against (None: this machine's)."""
    check_new_run(db, spec, project_id, device=device)
    try:  # a file in the way, a read-only folder: refused before the run row exists
        launch.runs_root(db, project_id).mkdir(parents=True, exist_ok=True)
    except LookupError as exc:
        raise StartRefused(str(exc)) from None
    except OSError as exc:
        raise StartRefused(f"cannot make the project's runs folder: {errors.describe(exc)}") from None
    try:  # create_run leaves no row and no folder of its own when it fails
        run = launch.create_run(db, project_id, spec, name)
    except OSError as exc:  # a file where the run folder goes, a full disk
        raise StartRefused(f"cannot make the run's folder: {errors.describe(exc)}") from None
    except (launch.RunConflict, ValueError) as exc:  # a folder not ours, a dataset of another project
        raise StartRefused(str(exc)) from None
    try:
        return launch.start(db, run.id)
    except launch.RunConflict as exc:  # another start claimed the device after our check
        _forget(db, run)
        raise StartRefused(f"{exc} Nothing was created.") from None
    except BaseException as exc:  # Ctrl-C, a full disk, a worker that could not start
        if _worker_started(db, run):
            if isinstance(exc, KeyboardInterrupt):
                raise StartedThenInterrupted(db.get_run(run.id)) from None
            raise
        _forget(db, run)
        raise


def _worker_started(db: Database, run: Run) -> bool:
    current = db.get_run(run.id)
    return (current is not None and current.status == RunStatus.RUNNING.value
            and current.pid not in (None, os.getpid()))


def _forget(db: Database, run: Run) -> None:
    """Delete the run row a refused start made, and the files this start wrote: ``runspec.json``,
    the worker log of a start that failed, then the folder if that left it empty. Only those:
    ``create_run`` accepts a folder that was there before, and nothing the user or an older run
    put there is ours to delete."""
    run = db.get_run(run.id)
    if run is None:
        return
    db.delete_run(run.id)
    root = launch.runs_root(db, run.project_id)
    try:
        config.child_path(root, run.folder or "")  # a plain name inside the runs folder
    except ValueError:
        return
    folder = root / run.folder
    if folder.is_symlink() or not folder.is_dir():  # never through a link, never a file
        return
    for name in ("runspec.json", launch.LOG_NAME):
        (folder / name).unlink(missing_ok=True)
    try:
        folder.rmdir()  # only if empty: anything else there was not written by this start
    except OSError:
        pass
