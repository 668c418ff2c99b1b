"""``peft-studio train`` and ``peft-studio stop``: a run from a runspec file, headless.

A refused train leaves nothing behind. Everything that can be checked without a run row is
checked first (the runspec, the model source, the dataset, the sample task, a run already
training on the device, the project name, that its runs folder can be made); only then are the
project (if new), the run row and its folder made. What can still go wrong after that — another
``train`` claiming the device in between (the claim itself is atomic, see ``launch.start``), a
worker that cannot be started, a full disk, a file where the run folder goes — deletes the row
and the files this train wrote (only those; ``_forget``) before the error is reported. A
refusal is one line, ``peft-studio train: <reason>``, and exit code 2.

After the worker started, Ctrl-C stops following, not training: the worker runs in its own
session (``launch``), so the line printed says so and how to stop it (``peft-studio stop``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from studio import errors

INTERRUPTED = 130  # the shell's convention for a command ended by Ctrl-C (128 + SIGINT)


class Refused(Exception):
    """A train that must not start; the message is the one line the user sees."""


class Detached(Exception):
    """Ctrl-C came just after the worker started: the run trains on without us."""

    def __init__(self, run) -> None:
        super().__init__(run.id)
        self.run = run


def add_parsers(sub: argparse._SubParsersAction) -> None:
    tr = sub.add_parser("train", help="train a run described by a runspec.json, in a worker process")
    tr.add_argument("runspec", help="a runspec.json (the Train tab saves one with every run)")
    tr.add_argument("--project", default="CLI runs", help="project to record the run in (created if new)")
    tr.add_argument("--name", default=None, help="a name for the run")
    tr.set_defaults(handler=train)

    st = sub.add_parser("stop", help="ask a training run to stop after its current step")
    st.add_argument("run_id", type=int)
    st.add_argument("--discard", action="store_true",
                    help="stop without saving a checkpoint (default: save one, so it can resume)")
    st.set_defaults(handler=stop)


def _fail(command: str, message: str) -> int:
    print(f"peft-studio {command}: {message}", file=sys.stderr, flush=True)
    return 2


def train(args: argparse.Namespace) -> int:
    """Create a run from a runspec file and train it in a worker, streaming its log here."""
    from studio.db import Database
    from studio.runspec import RunSpec, RunSpecError

    try:
        spec = RunSpec.load(args.runspec).validate()
    except (RunSpecError, ValueError) as exc:
        return _fail("train", str(exc))
    db = Database()
    try:
        run = _create_and_start(db, spec, args.project, args.name)
    except Refused as exc:
        return _fail("train", str(exc))
    except Detached as exc:
        return _detached(exc.run)
    return _follow(db, run)


def _precheck(db, spec, project_name: str) -> None:
    """Every refusal that needs no run row, before there is one."""
    from studio.models import ModelSourceError, parse_source
    from studio.runs import launch

    try:
        source = parse_source(spec.model)
    except ModelSourceError as exc:
        raise Refused(f"runspec 'model': {exc}") from None
    if source.kind == "folder" and not (Path(source.ref) / "config.json").is_file():
        raise Refused(f"runspec 'model': {source.ref} has no config.json: not a Hugging Face model folder")
    if spec.dataset_id is not None:
        dataset, project = db.get_dataset(spec.dataset_id), db.get_project_by_name(project_name)
        if dataset is None or project is None or dataset.project_id != project.id:
            raise Refused(f"runspec 'dataset_id': project '{project_name}' has no dataset "
                          f"{spec.dataset_id}; import it there first (the Data tab) or use a sample task")
    if spec.sample_task is not None:
        from studio.samples import get_task

        try:
            get_task(spec.sample_task)
        except KeyError as exc:
            raise Refused(f"runspec 'sample_task': {exc.args[0]}") from None
    busy = launch.active_run(db)
    if busy is not None:
        raise Refused(_conflict(busy))


def _conflict(busy) -> str:
    return (f"run {busy.id} ('{busy.name}', pid {busy.pid}) is training on this machine; two "
            f"trainings would fight for the same device. Wait for it to finish or stop it "
            f"(peft-studio stop {busy.id}). Nothing was created.")


def _create_and_start(db, spec, project_name: str, name: str | None):
    from studio import projects
    from studio.runs import launch

    _precheck(db, spec, project_name)
    try:
        project = projects.get_or_create_project(db, project_name)
    except ValueError as exc:  # an empty or too long name: refused before any write
        raise Refused(f"--project: {exc}") from None
    try:  # a file in the way, a read-only folder: refuse before the run row exists
        launch.runs_root(db, project.id).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Refused(f"cannot make the project's runs folder: {errors.describe(exc)}") from None
    # create_run leaves no row and no folder of its own when it fails (launch.create_run)
    try:
        run = launch.create_run(db, project.id, spec, name)
    except OSError as exc:  # a file where the run folder goes, a full disk
        raise Refused(f"cannot make the run's folder: {errors.describe(exc)}") from None
    except (launch.RunConflict, ValueError) as exc:  # a folder not ours, a dataset of another project
        raise Refused(str(exc)) from None
    try:
        return launch.start(db, run.id)
    except launch.RunConflict as exc:  # another train claimed the device after our check
        _forget(db, run)
        raise Refused(f"{exc} Nothing was created.") from None
    except BaseException as exc:  # Ctrl-C, a full disk, a worker that could not start
        if _worker_started(db, run):
            if isinstance(exc, KeyboardInterrupt):
                raise Detached(db.get_run(run.id)) from None
            raise
        _forget(db, run)
        raise


def _worker_started(db, run) -> bool:
    if run is None:
        return False
    current = db.get_run(run.id)
    return current.status == "running" and current.pid not in (None, os.getpid())


def _forget(db, run) -> None:
    """Delete the run row a refused start made, and the files this train wrote: ``runspec.json``,
    the worker log of a start that failed, then the folder if that left it empty. Only those:
    ``create_run`` accepts a folder that was there before, and nothing the user or an older run
    put there is ours to delete."""
    from studio import config
    from studio.runs import launch

    run = db.get_run(run.id)
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
        folder.rmdir()  # only if empty: anything else there was not written by this train
    except OSError:
        pass


def _detached(run) -> int:
    print(f"\npeft-studio train: stopped following run {run.id}; its worker keeps training in "
          f"the background. Stop it with `peft-studio stop {run.id}` (saves a checkpoint), or "
          "follow it in the UI's Train tab.", file=sys.stderr, flush=True)
    return INTERRUPTED


def _follow(db, run) -> int:
    """Stream the worker's log until the run ends; Ctrl-C or a lost database stops following
    only, and says so."""
    from studio.runs import launch

    log = launch.run_folder(db, run) / launch.LOG_NAME
    project = db.get_project(run.project_id)
    offset = 0
    try:  # the announcement too: a Ctrl-C right after it must still only stop following
        print(f"run {run.id} started in project '{project.name}'; log: {log}", flush=True)
        while True:
            time.sleep(1.0)
            launch.reconcile(db)
            with open(log, encoding="utf-8", errors="replace") as fh:
                fh.seek(offset)
                chunk = fh.read()
                offset = fh.tell()
            if chunk:
                print(chunk, end="", flush=True)
            current = db.get_run(run.id)
            if current.status != "running":
                print(f"run {run.id}: {current.status}" + (f"\n{current.error}" if current.error else ""))
                return 0 if current.status in ("completed", "cancelled") else 1
    except KeyboardInterrupt:
        return _detached(run)
    except Exception as exc:
        line = errors.describe(exc)
        if line is None:
            raise
        return _fail("train", f"{line} Run {run.id} keeps training in its worker; follow it in "
                              f"the UI or stop it with `peft-studio stop {run.id}`.")


def stop(args: argparse.Namespace) -> int:
    from studio.db import Database
    from studio.runs import launch

    db = Database()
    run = db.get_run(args.run_id)
    if run is None:
        return _fail("stop", f"there is no run {args.run_id} in the history {db.path}")
    if run.status != "running" and not (run.status == "queued" and run.queued_at is not None):
        return _fail("stop", f"run {run.id} is {run.status} (not training or waiting in the queue); "
                             "there is nothing to stop")
    run = launch.stop(db, run.id, "discard" if args.discard else "save")
    if run.status == "cancelled":
        print(f"run {run.id} was waiting in the queue and is cancelled")
    else:
        what = "without saving" if args.discard else "after saving a checkpoint (resume it later)"
        print(f"run {run.id}: asked to stop at the end of its current step, {what}")
    return 0
