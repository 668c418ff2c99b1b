"""What a run's row means, beyond its status: how a stopped run was stopped, and where a
Resume starts.

Both stop modes end a run with the status ``cancelled`` (the status says "ended on request"),
but they leave different things behind: "Stop and save" keeps a checkpoint that Resume
continues from, "Stop and discard" removes every checkpoint, so a Resume starts again at step 0.
The row keeps which one it was (``cancel_request``; a SIGTERM/SIGINT stop acts like "save" and
says so in ``error``), and the words shown for the run come from here, so that no screen says
"resumed from its latest checkpoint" about a run that has none.
"""

from __future__ import annotations

from pathlib import Path

from studio.db import Checkpoint, Database, Run, RunStatus

SAVED, DISCARDED, NEVER_STARTED = "saved", "discarded", "never started"


def resume_point(db: Database, run_id: int) -> Checkpoint | None:
    """The checkpoint a Resume of ``run_id`` continues from: the latest recorded one, if its
    folder is still there (the worker's own rule; None: it starts again from step 0)."""
    latest = db.latest_checkpoint(run_id)
    return latest if latest is not None and Path(latest.path).is_dir() else None


def stop_kind(run: Run) -> str | None:
    """For a cancelled run: ``SAVED`` (Stop and save, or a signal), ``DISCARDED`` (Stop and
    discard) or ``NEVER_STARTED`` (cancelled while waiting in the queue); None otherwise."""
    if run.status != RunStatus.CANCELLED.value:
        return None
    if run.cancel_request == "discard":
        return DISCARDED
    if run.cancel_request == "save" or (run.error or "").startswith("Stopped by"):
        return SAVED
    return NEVER_STARTED if run.started_at is None else SAVED


def status_words(db: Database, run: Run) -> str:
    """The run's status as a person reads it: the status itself (what History filters by), then
    what the stop left ("cancelled: stopped and saved, checkpoint at step 40 kept", "cancelled:
    stopped and discarded, no checkpoint kept", "cancelled before it started"); other statuses
    as they are."""
    kind = stop_kind(run)
    if kind == DISCARDED:
        return f"{run.status}: stopped and discarded, no checkpoint kept"
    if kind == NEVER_STARTED:
        return f"{run.status} before it started"
    if kind == SAVED:
        point = resume_point(db, run.id)
        kept = f"checkpoint at step {point.step} kept" if point else "no checkpoint was saved"
        return f"{run.status}: stopped and saved, {kept}"
    return run.status
