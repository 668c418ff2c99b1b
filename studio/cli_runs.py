"""``peft-studio runs``: list, show, stop, resume, rename, annotate and delete a project's runs,
as the History and Train tabs do, with ``--json`` output; ``runs export`` copies runs into an
experiment tracker (``studio.trackers.cli``).

    peft-studio runs list --project demo --status completed --json
    peft-studio runs show 7
    peft-studio runs stop 7 [--discard]      # the same command as the top-level `stop`
    peft-studio runs resume 7 [--wait]

Every action is the tabs' own call: the runs table from ``studio.history``, a run's status in
words from ``studio.runs.outcome``, stop and resume through ``studio.runs.launch`` (refused as
the Train tab refuses them: a run that is not failed, cancelled or out of memory, a combined
adapter, a run whose old worker still lives), rename/note/delete through ``studio.history``.
Like the UI's poll, the commands first mark runs whose worker is gone as failed
(``launch.reconcile``). A refusal is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from studio.cli_projects import ProjectChoiceError, emit, fail, plain, resolve_project


class UnknownRun(LookupError):
    pass


def _run(db, run_id: int):
    run = db.get_run(run_id)
    if run is None:  # the words of the top-level `stop`, so every command says it alike
        raise UnknownRun(f"there is no run {run_id} in the history {db.path}")
    return run


def _iso(value) -> str | None:
    return value.isoformat() if value is not None else None


def summary_dict(row) -> dict[str, Any]:
    """A ``history.RunSummary`` (one row of the History tab's table) as JSON values."""
    from dataclasses import asdict

    out = asdict(row)
    out["created_at"] = _iso(row.created_at)
    return out


def _cmd_list(args: argparse.Namespace) -> int:
    from studio import history
    from studio.db import Database, RunStatus
    from studio.runs import launch
    from studio.ui.history_view import cell, status_text

    statuses = [s.value for s in RunStatus]
    if args.status is not None and args.status not in statuses:
        return fail("runs list", f"--status must be one of {', '.join(statuses)} (got {args.status!r})")
    db = Database()
    try:
        project = resolve_project(db, args.project)
    except ProjectChoiceError as exc:
        return fail("runs list", str(exc))
    launch.reconcile(db)
    rows = history.filter_runs(history.run_summaries(db, project.id),
                               statuses=[args.status] if args.status else ())
    lines = [f"#{r.id:<4} {r.name}  [{status_text(r)}]  {r.method}  {r.settings}  steps {cell('steps', r.steps)}"
             f"  train loss {cell('train_loss', r.train_loss)}  eval loss {cell('eval_loss', r.eval_loss)}"
             for r in rows]
    emit(args, {"project": project.name, "runs": [summary_dict(r) for r in rows]},
         "\n".join(lines) or f"project {project.name!r} has no runs" + (f" {args.status}" if args.status else ""))
    return 0


def run_details(db, run) -> dict[str, Any]:
    """What ``runs show`` says about one run: the History tab's row and run panel, with the
    checkpoints, exports, spec, error and the log's last lines."""
    from pathlib import Path

    from studio import history
    from studio.adapters import derived
    from studio.db.summary import metric_summaries
    from studio.runs import outcome
    from studio.ui import train_view

    (row,) = history.summarize(db, [run])
    metrics = metric_summaries(db, [run.id])[run.id]
    point = outcome.resume_point(db, run.id)
    project = db.get_project(run.project_id)
    return {
        "id": run.id, "name": run.name, "project": project.name, "method": run.method,
        "status": run.status, "status_words": outcome.status_words(db, run), "stopped": row.stopped,
        "error": run.error, "steps": row.steps, "total_steps": train_view.total_steps(db, run),
        "last": {name: {"step": step, "value": value} for name, (step, value) in sorted(metrics.last.items())},
        "train_loss": row.train_loss, "eval_loss": row.eval_loss, "eval_exact_match": row.eval_score,
        "duration_s": row.duration_s, "peak_memory_bytes": row.peak_memory_bytes,
        "checkpoints": [{"step": c.step, "path": c.path, "on_disk": Path(c.path).is_dir()}
                        for c in db.list_checkpoints(run.id)],
        "resumes_from_step": point.step if point is not None else None,
        "exports": [{"id": e.id, "kind": e.kind, "dtype": e.dtype, "status": e.status, "path": e.path,
                     "size_bytes": e.size_bytes} for e in db.list_exports(run.project_id) if e.run_id == run.id],
        "recipe": derived.describe(db, run), "notes": run.notes or "", "folder": run.folder,
        "pid": run.pid, "activity": run.activity, "created_at": _iso(run.created_at),
        "started_at": _iso(run.started_at), "finished_at": _iso(run.finished_at), "spec": run.spec,
        "log_tail": train_view.clean_log(db, run, lines=20),
    }


def _show_text(d: dict[str, Any]) -> str:
    from studio.ui.history_view import cell, memory

    last = ", ".join(f"{name} {value['value']:.4g} (step {value['step']})" for name, value in d["last"].items()
                     if isinstance(value["value"], float))
    lines = [f"#{d['id']} {d['name']}  (project {d['project']!r}, method {d['method']})",
             f"status: {d['status_words']}",
             f"steps: {cell('steps', d['steps'])}" + (f" of {d['total_steps']}" if d["total_steps"] else ""),
             f"last metrics: {last or '—'}",
             f"duration: {cell('duration_s', d['duration_s'])}; peak memory: {memory(d['peak_memory_bytes'])}",
             "checkpoints: " + (", ".join(f"step {c['step']}" + ("" if c["on_disk"] else " (gone)")
                                          for c in d["checkpoints"]) or "none"),
             "exports: " + ("; ".join(f"#{e['id']} {e['kind']} {e['dtype'] or ''} {e['status']} {e['path']}"
                                      for e in d["exports"]) or "none"),
             f"folder: {d['folder'] or '—'}"]
    if d["recipe"]:
        lines.append(f"combined from: {d['recipe']}")
    if d["notes"]:
        lines.append(f"notes: {d['notes']}")
    if d["error"]:
        lines.append(f"what went wrong:\n{d['error'].strip()}")
    if d["log_tail"]:
        lines.append(f"log (last lines):\n{d['log_tail']}")
    return "\n".join(lines)


def _cmd_show(args: argparse.Namespace) -> int:
    from studio.db import Database
    from studio.runs import launch

    db = Database()
    launch.reconcile(db)
    try:
        run = _run(db, args.run_id)
    except UnknownRun as exc:
        return fail("runs show", str(exc))
    details = run_details(db, run)
    emit(args, details, _show_text(details))
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    from studio.cli_train import stop

    return stop(args)  # one stop for `stop` and `runs stop`: same checks, same words


def _cmd_resume(args: argparse.Namespace) -> int:
    from studio.cli_train import _follow
    from studio.db import Database
    from studio.runs import launch, outcome
    from studio.ui import train_view

    db = Database()
    launch.reconcile(db)  # a worker that died is not "running" any more: it can be resumed
    try:
        run = _run(db, args.run_id)
        point, stop = outcome.resume_point(db, run.id), outcome.stop_kind(run)  # before the worker moves on
        log = launch.run_folder(db, run) / launch.LOG_NAME
        offset = log.stat().st_size if log.is_file() else 0
        run = launch.resume(db, run.id)
    except (UnknownRun, launch.RunConflict) as exc:  # RunFolderError is a RunConflict
        return fail("runs resume", str(exc))
    message = plain(train_view.resumed_message(run.id, point, stop))
    if not args.wait:
        emit(args, {"id": run.id, "status": run.status, "resumed_from_step": point.step if point else None,
                    "message": message}, message)
        return 0
    if not args.json:
        print(message, flush=True)
        return _follow(db, run, offset=offset, verb="resumed")
    return _wait_quietly(db, run.id, point)


def _wait_quietly(db, run_id: int, point) -> int:
    """``resume --wait --json``: no log on stdout, one JSON object once the run has ended."""
    from studio.db import RunStatus
    from studio.runs import launch

    while True:
        time.sleep(1.0)
        launch.reconcile(db)
        run = db.get_run(run_id)
        if run.status != RunStatus.RUNNING.value:
            break
    print(json.dumps({"id": run.id, "status": run.status, "error": run.error,
                                    "resumed_from_step": point.step if point else None}, indent=2))
    return 0 if run.status in (RunStatus.COMPLETED.value, RunStatus.CANCELLED.value) else 1


def _cmd_rename(args: argparse.Namespace) -> int:
    from studio import history
    from studio.db import Database

    try:
        run = history.rename_run(Database(), args.run_id, args.name)
    except history.HistoryError as exc:
        return fail("runs rename", str(exc))
    emit(args, {"id": run.id, "name": run.name}, f"run #{run.id} is now {run.name!r}")
    return 0


def _cmd_note(args: argparse.Namespace) -> int:
    from studio import history
    from studio.db import Database

    try:
        run = history.set_note(Database(), args.run_id, args.text)
    except history.HistoryError as exc:
        return fail("runs note", str(exc))
    emit(args, {"id": run.id, "notes": run.notes}, f"run #{run.id}'s notes saved")
    return 0


def _cmd_delete(args: argparse.Namespace) -> int:
    from studio import history
    from studio.db import Database

    db = Database()
    try:
        run = _run(db, args.run_id)
    except UnknownRun as exc:
        return fail("runs delete", str(exc))
    if not args.yes:  # the History tab's confirmation, as a flag a script must spell out
        return fail("runs delete", f"this deletes run #{run.id} ({run.name!r}) with its metrics, checkpoints "
                                   "and files (its exports are kept); it cannot be undone. Pass --yes to delete it.")
    try:
        removed = history.delete_run(db, run.id)
    except history.HistoryError as exc:
        return fail("runs delete", str(exc))
    emit(args, {"deleted": run.id, "removed": removed}, f"deleted run #{run.id}" +
         (f" and {', '.join(removed)}" if removed else ""))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    runs = sub.add_parser("runs", help="list, show, stop, resume runs; copy them into a tracker")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True)

    def command(name: str, handler, help: str, run_id: bool = True) -> argparse.ArgumentParser:
        cmd = runs_sub.add_parser(name, help=help)
        if run_id:
            cmd.add_argument("run_id", type=int)
        cmd.add_argument("--json", action="store_true", help="print one JSON object")
        cmd.set_defaults(handler=handler)
        return cmd

    ls = command("list", _cmd_list, "a project's runs, newest first (the History tab's table)", run_id=False)
    ls.add_argument("--project", default=None, help="the project, by name or id (default: the only project there is)")
    ls.add_argument("--status", default=None, help="only runs with this status: queued, running, completed, "
                                                   "failed, cancelled or oom")
    command("show", _cmd_show, "one run: status and why, steps, metrics, checkpoints, exports, error")
    st = command("stop", _cmd_stop, "ask a training run to stop after its current step, at once during an evaluation (as `stop`)")
    st.add_argument("--discard", action="store_true",
                    help="stop without saving a checkpoint (default: save one, so it can resume)")
    rs = command("resume", _cmd_resume, "resume a failed, cancelled or out-of-memory run from its latest "
                                        "checkpoint (from step 0 when it has none)")
    rs.add_argument("--wait", action="store_true", help="follow the run until it ends (its log, unless --json)")
    rn = command("rename", _cmd_rename, "give a run a new name (its folder keeps its name)")
    rn.add_argument("name")
    nt = command("note", _cmd_note, "replace a run's notes")
    nt.add_argument("text")
    rm = command("delete", _cmd_delete, "delete a finished run: its row, metrics, checkpoints and folder")
    rm.add_argument("--yes", action="store_true", help="confirm: this cannot be undone")

    from studio.trackers.cli import add_export_parser

    add_export_parser(runs_sub)  # runs export --tracker ...
