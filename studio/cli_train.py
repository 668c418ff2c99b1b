"""``peft-studio train`` and ``peft-studio stop``: a run from a runspec file, headless.

A refused train leaves nothing behind. The run is started through the one door the Train tab
uses too (``studio.runs.start``): every check that needs no run row first (the runspec, the
model source, the dataset, the sample task, a run already training on the device, on a GPU the
memory estimate), then the row, its folder and the worker; a start that loses the device to
another one in between deletes what it made. For a project that does not exist yet the same
checks run before the project is created, so a refusal leaves no empty project either. A
refusal is one line, ``peft-studio train: <reason>``, and exit code 2.

After the worker started, Ctrl-C stops following, not training: the worker runs in its own
session (``launch``), so the line printed says so and how to stop it (``peft-studio stop``).
"""

from __future__ import annotations

import argparse
import sys
import time

from studio import errors
from studio.db import RunStatus

INTERRUPTED = 130  # the shell's convention for a command ended by Ctrl-C (128 + SIGINT)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    tr = sub.add_parser("train", help="train a run described by a runspec.json, in a worker process")
    tr.add_argument("runspec", help="a runspec.json (the Train tab saves one with every run)")
    tr.add_argument("--project", default="CLI runs", help="project to record the run in (created if new)")
    tr.add_argument("--name", default=None, help="a name for the run")
    tr.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                    help="worker processes on this machine (the runspec's nproc_per_node): N > 1 trains "
                         "with DDP under torchrun (gloo on a CPU); 0 = one per visible GPU")
    tr.set_defaults(handler=train)

    st = sub.add_parser("stop", help="ask a training run to stop after its current step (at once during an evaluation)")
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
    from studio.runs.start import StartedThenInterrupted, StartRefused
    from studio.runspec import RunSpec, RunSpecError

    try:
        spec = RunSpec.load(args.runspec)
        if args.nproc_per_node is not None:  # the flag wins over the file, and is checked as the field
            spec.nproc_per_node = args.nproc_per_node
        spec.validate()
    except (RunSpecError, ValueError) as exc:
        return _fail("train", str(exc))
    db = Database()
    try:
        run = _start(db, spec, args.project, args.name)
    except StartRefused as exc:
        return _fail("train", str(exc))
    except StartedThenInterrupted as exc:
        return _detached(exc.run)
    return _follow(db, run)


def _start(db, spec, project_name: str, name: str | None):
    from studio import projects
    from studio.runs import start

    if db.get_project_by_name(project_name) is None:  # refuse before making a project for nothing
        start.check_new_run(db, spec, None)
    try:  # get-or-create in one transaction: two trains naming a new project both get it
        project = projects.get_or_create_project(db, project_name)
    except ValueError as exc:  # an empty or too long name: refused before any write
        raise start.StartRefused(f"--project: {exc}") from None
    return start.start_new_run(db, project.id, spec, name=name)


def _detached(run) -> int:
    print(f"\npeft-studio train: stopped following run {run.id}; its worker keeps training in "
          f"the background. Stop it with `peft-studio stop {run.id}` (saves a checkpoint), or "
          "follow it in the UI's Train tab.", file=sys.stderr, flush=True)
    return INTERRUPTED


def _follow(db, run, offset: int = 0, verb: str = "started") -> int:
    """Stream the worker's log from byte ``offset`` (a resumed run's log goes on after the
    earlier attempts) until the run ends; Ctrl-C or a lost database stops following only, and
    says so."""
    from studio.runs import launch

    log = launch.run_folder(db, run) / launch.LOG_NAME
    project = db.get_project(run.project_id)
    try:  # the announcement too: a Ctrl-C right after it must still only stop following
        print(f"run {run.id} {verb} in project '{project.name}'; log: {log}", flush=True)
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
            if current.status != RunStatus.RUNNING.value:
                print(f"run {run.id}: {current.status}" + (f"\n{current.error}" if current.error else ""))
                return 0 if current.status in (RunStatus.COMPLETED.value, RunStatus.CANCELLED.value) else 1
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
    if not run.in_flight:
        return _fail("stop", f"run {run.id} is {run.status} (not training or waiting in the queue); "
                             "there is nothing to stop")
    run = launch.stop(db, run.id, "discard" if args.discard else "save")
    if getattr(args, "json", False):  # `runs stop --json` (studio/cli_runs.py) shares this command
        import json

        print(json.dumps({"id": run.id, "status": run.status, "cancel_request": run.cancel_request}))
    elif run.status == RunStatus.CANCELLED.value:
        print(f"run {run.id} was waiting in the queue and is cancelled")
    else:
        what = "without saving" if args.discard else "after saving a checkpoint (resume it later)"
        print(f"run {run.id}: asked to stop at the end of its current step, {what}")
    return 0
