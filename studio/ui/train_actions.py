"""What the Train tab's buttons do, without Gradio: start the session draft's run (through
``runs.start``, the one door the CLI uses too), stop, resume, and list a project's runs.

The UI never trains in its own process (and never imports torch): a start writes the RunSpec into
a new run and starts ``python -m studio.worker``; the database is the only channel back.
Plain values in, (message, ...) out, so tests drive them against a real database and worker.
"""

from __future__ import annotations

import dataclasses
import threading

from studio.adapters import derived
from studio.db import Database, RunStatus
from studio.runs import launch, outcome
from studio.runs.start import StartRefused, start_new_run
from studio.run_setup import DeviceFacts
from studio.ui import labels, train_view
from studio.ui.draft import RunDraft
from studio.ui.labels_compose import DERIVED

# A second click while the first start is still checking: the start service's claim is atomic,
# but serialising here keeps the refusal the friendly "is training" one rather than a conflict.
_start_lock = threading.Lock()


def run_choices(db: Database, project_id: int | None) -> list[tuple[str, int]]:
    """Newest first, so a restarted UI selects the run that is (or was last) training."""
    return choices_of(db.list_runs(project_id) if project_id is not None else [])


def choices_of(runs: list) -> list[tuple[str, int]]:
    return [(f"#{r.id} {r.name} — {r.status}", r.id) for r in runs]


def run_to_follow(runs: list, shown_before: list[tuple[str, int]] | None, selected: int | None) -> int | None:
    """The run the Train panel shows after a poll: a run that appeared since the page's last
    list (started here, from the CLI or by a bake-off) — the running one first, else the newest —
    otherwise the selected one while it exists, else the newest. Without this, a poll that began
    before Start's answer wrote the old selection back and the panel stayed on the old run."""
    ids = [r.id for r in runs]  # the project's runs, newest first
    if shown_before is not None:
        known = {choice[1] for choice in shown_before}
        fresh = [r for r in runs if r.id not in known]
        if fresh:
            return next((r.id for r in fresh if r.status == RunStatus.RUNNING.value), fresh[0].id)
    return selected if selected in ids else (ids[0] if ids else None)


def start_run(db: Database, project_id: int | None, draft: RunDraft, device: DeviceFacts | None = None
              ) -> tuple[str, int | None]:
    """Start the draft's run on the project's model; (message, run id or None when refused: then
    nothing was created). ``device``: the device facts to check memory against (None: this machine)."""
    msg = labels.TRAIN_MSG
    project = db.get_project(project_id) if project_id is not None else None
    if project is None:
        return msg["no_project"], None
    with _start_lock:
        try:
            spec = draft.run_spec(project.model_source)
            run = start_new_run(db, project.id, spec, device=device)
        except (StartRefused, ValueError, TypeError) as exc:  # RunSpecError is a ValueError
            return msg["refused"].format(reason=exc), None
    return msg["started"].format(id=run.id, name=run.name), run.id


def stop_run(db: Database, run_id: int | None, mode: str) -> str:
    run = db.get_run(run_id) if run_id is not None else None
    if run is None or run.status != RunStatus.RUNNING.value:
        return labels.TRAIN_MSG["not_running"]
    launch.stop(db, run_id, mode)
    kept = labels.TRAIN_MSG["kept"][mode]
    return labels.TRAIN_MSG["stopping"].format(id=run_id, kept=kept)


def resume_run(db: Database, run_id: int | None) -> str:
    run = db.get_run(run_id) if run_id is not None else None
    if run is None:
        return labels.TRAIN_MSG["no_resume"]
    if derived.is_derived(run):  # combined from trained adapters: there is no training to continue
        return DERIVED["no_resume"].format(id=run.id)
    point, stop = outcome.resume_point(db, run_id), outcome.stop_kind(run)  # before the worker moves on
    with _start_lock:  # the same check-then-start as start_run
        try:
            launch.resume(db, run_id)
        except launch.RunConflict as exc:
            return labels.TRAIN_MSG["not_resumed"].format(reason=exc)
    return train_view.resumed_message(run_id, point, stop)  # from step 0 after a discard, and says so


def with_tracker(draft: RunDraft, name: str, on: bool) -> RunDraft:
    """The draft with tracker ``name`` switched on or off (its ``trackers`` list kept in
    ``TRACKERS`` order); a missing package is refused at Start, with the install line."""
    from studio.trackers.choice import TRACKERS, known

    known(name)
    chosen = set(draft.spec.trackers) - {name} | ({name} if on else set())
    spec = dataclasses.replace(draft.spec, trackers=[t for t in TRACKERS if t in chosen],
                               method_settings=dict(draft.spec.method_settings))  # never shared
    return dataclasses.replace(draft, spec=spec)
