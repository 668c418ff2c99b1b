"""``python -m studio.jobs.preflight --model MODEL [--resume]``: what ``launch.sh`` runs on the
first node, in the job's home, before the launcher starts any worker (and ``--ended CODE`` after
a launcher that failed: a run left "running" is recorded as failed, as ``launch.reconcile`` does
for a local run, since no supervisor watches a job).

- The model: ``MODEL`` at the top of launch.sh is the one place a user changes the base model
  (a copy of it on the cluster); it is written into the job's run (its row and runspec.json),
  which is what every rank reads. Other nodes' workers only start once the rendezvous has every
  node, so they read it after this has run.
- A moved folder: the job folder is copied between machines, and the history records absolute
  checkpoint paths; they are pointed at this folder again so that ``--resume`` finds them.
- A finished job is not trained again (import it), and a stopped or failed one is continued
  with ``--resume`` only, never silently restarted over its checkpoints.

Exit code 0: go on; 2: a refusal, printed as one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from studio import config
from studio.jobs.manifest import JobError, Manifest, run_dir


def _open(job: Path) -> tuple[Manifest, Any]:
    """The job's manifest and history, refusing a PEFT_STUDIO_HOME that is not the job's."""
    from studio.db import Database
    from studio.db.engine import JOB_MARKER

    manifest = Manifest.load(job)
    projects = config.projects_dir()
    if not (projects / JOB_MARKER).is_file() or projects.resolve() != (job / "home" / "projects").resolve():
        raise JobError(f"PEFT_STUDIO_HOME must be the job's home {job / 'home'} (launch.sh sets it)")
    return manifest, Database()


def preflight(job: Path, model: str, resume: bool) -> str:
    """Prepares the job's run; returns what it did, one line. ``JobError`` when it must not start."""
    from studio.db import RunStatus
    from studio.runspec import RunSpec, RunSpecError

    manifest, db = _open(job)
    try:
        run = db.get_run(manifest.run_id)
        if run is None:
            raise JobError(f"the job's history has no run {manifest.run_id}")
        status = run.status
        if status == RunStatus.COMPLETED.value:
            raise JobError(f"run {run.id} has finished: bring it home with `peft-studio job import {job}`")
        if status != RunStatus.QUEUED.value and not resume:
            raise JobError(f"run {run.id} was {status}: `./launch.sh --resume` continues from its "
                           "latest checkpoint (nothing is started over it)")
        spec = RunSpec.from_dict(run.spec)
        done = []
        if model.strip() and model != spec.model:
            spec.model = model.strip()
            try:
                spec.validate()
                _check_model(spec.model)
            except (RunSpecError, ValueError) as exc:
                raise JobError(f"MODEL in launch.sh: {exc}") from None
            db.update_run(run.id, spec=spec.to_dict())
            spec.save(run_dir(job, manifest) / "runspec.json")
            done.append(f"model set to {spec.model}")
        moved = _repoint_checkpoints(db, run.id, run_dir(job, manifest) / "checkpoints")
        if moved:
            done.append(f"{moved} checkpoint path(s) pointed at {job}")
        return f"job {manifest.job_id}, run {run.id} ({status}): " + ("; ".join(done) or "ready")
    finally:
        db.close()


def ended(job: Path, code: int) -> str:
    """After the launcher exited with ``code`` (not 0): a run still "running" is marked failed,
    with the reason and the log's tail (no supervisor watches a job; the workers are gone, or
    the run would not be marked: a worker that ended by itself recorded its own status)."""
    from studio.db import RunStatus, utcnow

    manifest, db = _open(job)
    try:
        run = db.get_run(manifest.run_id)
        if run is None or run.status != RunStatus.RUNNING.value:
            return f"run {manifest.run_id}: {run.status if run else 'missing'}"
        log = run_dir(job, manifest) / "worker.log"
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-40:]) \
            if log.is_file() else ""
        db.update_run(run.id, status=RunStatus.FAILED.value, finished_at=utcnow(), exit_code=code,
                      error=f"the job's launcher ended with exit code {code} while run {run.id} was training "
                            "(a rank killed or out of memory, a node lost?); `./launch.sh --resume` "
                            f"continues from the latest checkpoint.\n\n--- last lines of worker.log ---\n{tail}")
        return f"run {run.id} marked failed (launcher exit code {code})"
    finally:
        db.close()


def _check_model(source: str) -> None:
    """A hub id or a path that is there (no download, no weights read)."""
    from studio.models import ModelSourceError, parse_source

    try:
        parse_source(source)
    except ModelSourceError as exc:
        raise ValueError(str(exc)) from None


def _repoint_checkpoints(db, run_id: int, checkpoints: Path) -> int:
    """Checkpoint rows whose recorded path is gone but whose folder is in this job's run folder
    (by name: ``checkpoint-<step>``) now name it; returns how many."""
    moved = 0
    for row in db.list_checkpoints(run_id):
        here = checkpoints / Path(row.path).name
        if Path(row.path) != here and not Path(row.path).is_dir() and here.is_dir():
            db.add_checkpoint(run_id, row.step, here)  # same step: replaces the path
            moved += 1
    return moved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studio.jobs.preflight")
    parser.add_argument("--model", default="", help="the base model launch.sh's MODEL names")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--ended", type=int, default=None, metavar="CODE",
                        help="after the launcher: it exited with CODE; record a run left running as failed")
    parser.add_argument("--job", default=None, help="the job folder (default: the home's parent)")
    args = parser.parse_args(argv)
    job = Path(args.job).resolve() if args.job else config.studio_home().parent
    try:
        if args.ended is not None:
            print(f"launch.sh: {ended(job, args.ended)}", flush=True)
        else:
            print(f"preflight: {preflight(job, args.model, args.resume)}", flush=True)
    except Exception as exc:  # a refusal, or the world (a locked or read-only history): one line
        from studio import errors

        line = str(exc) if isinstance(exc, JobError) else errors.describe(exc)
        if line is None:
            raise
        print(f"launch.sh: {line}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
