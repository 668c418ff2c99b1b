"""Copying runs from the studio's history into a tracker (``peft-studio runs export``): every
metric row with its step and wall time, and the run's spec. The history is the source of truth;
the tracker gets a copy, and a second export of a run *replaces* its copy (also the one logged
live while it trained), so the tracker never holds two differing copies of one run.

- MLflow: the project's local store (or ``--dest DIR``: a store in DIR), experiment = the
  project, one MLflow run per studio run, found again by its ``peft_studio.run_id`` tag; the new
  copy is written before the old one is deleted (MLflow's soft delete), so a failed export loses
  nothing.
- TensorBoard: ``<run folder>/tensorboard`` (or ``DIR/<project folder>/<run folder>``), the tags
  transformers' callback uses (``train/loss``, ``eval/loss``), the spec as a text summary;
  written into a sibling folder and swapped in, and only over a folder that holds nothing but
  event files.

Every run is checked before anything is written: an unknown id or project is an error naming
it. A run still training (or waiting in the queue) is refused when named, skipped with the reason
under ``--project`` / ``--all``: its history is still growing.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from studio import config
from studio.trackers import mlflow_store as stores
from studio.trackers.choice import (TITLES, TrackerError, mlflow_store, project_folder, require,
                                    tensorboard_dir, view_command)
from studio.trackers.live import MLFLOW_STATUS

EVENTS_PREFIX = "events.out.tfevents."


def select(db: Any, run_ids: list[int], project: str | None, every: bool) -> list[Any]:
    """The runs to export, in id order: the ids given, a project's runs, or every run."""
    if sum((bool(run_ids), project is not None, every)) != 1:
        raise TrackerError("name the runs to export: run ids, or --project NAME, or --all (one of them)")
    if project is not None:
        found = db.get_project_by_name(project)
        if found is None:
            names = ", ".join(repr(p.name) for p in db.list_projects()) or "none yet"
            raise TrackerError(f"no project named {project!r} (projects: {names})")
        return db.list_runs(found.id)
    if every:
        return db.list_runs()
    runs = []
    for run_id in dict.fromkeys(run_ids):  # each once, in the order given
        run = db.get_run(run_id)
        if run is None:
            raise TrackerError(f"no run with id {run_id} in this studio's history "
                               "(peft-studio runs list shows the runs)")
        if run.in_flight:
            raise TrackerError(f"run {run_id} is {run.status}: its history is still growing; "
                               "export it once it has ended")
        runs.append(run)
    return runs


def export(db: Any, tracker: str, runs: list[Any], dest: Path | None = None) -> list[dict[str, Any]]:
    """Copy ``runs`` into ``tracker``; one result per run: ``action`` created, replaced or
    skipped (with ``reason``), the metric rows copied, where the copy is and how to view it."""
    require(tracker)
    if dest is not None:
        dest = Path(dest).expanduser().resolve()
        if dest.exists() and not dest.is_dir():
            raise TrackerError(f"--dest {dest} is a file; give a folder (created if missing)")
    projects = {p.id: p for p in db.list_projects()}
    results = []
    for run in runs:
        project = projects[run.project_id]
        base = {"run_id": run.id, "name": run.name, "project": project.name, "status": run.status}
        if run.in_flight:
            results.append({**base, "action": "skipped", "reason": f"{run.status}: export it once it has ended"})
            continue
        if tracker == "tensorboard" and not run.folder and dest is None:
            results.append({**base, "action": "skipped", "reason": "the run has no folder to log into: give --dest"})
            continue
        metrics = db.metrics_for(run.id)
        if tracker == "mlflow":
            done = _to_mlflow(project, run, metrics, dest)
        else:
            done = _to_tensorboard(project, run, metrics, dest)
        results.append({**base, **done, "metrics": len(metrics)})
    return results


def _to_mlflow(project: Any, run: Any, metrics: list[Any], dest: Path | None) -> dict[str, Any]:
    from mlflow.entities import Metric

    store = dest if dest is not None else mlflow_store(project_folder(project))
    client = stores.client(store)
    experiment = stores.experiment(client, project.name, store)
    old = stores.copies_of(client, experiment, run.id)
    mlflow_id = stores.new_run(client, experiment, project, run, stores.millis(run.started_at or run.created_at))
    rows = [Metric(m.name, m.value, stores.millis(m.wall_time), m.step) for m in metrics]
    for i in range(0, len(rows), stores.METRICS_PER_BATCH):
        client.log_batch(mlflow_id, metrics=rows[i:i + stores.METRICS_PER_BATCH])
    if run.status in MLFLOW_STATUS:  # a run created and never started stays as MLflow made it
        client.set_terminated(mlflow_id, MLFLOW_STATUS[run.status], stores.millis(run.finished_at))
    for copy in old:  # only once the new copy is complete
        client.delete_run(copy.info.run_id)
    return {"action": "replaced" if old else "created", "tracker": TITLES["mlflow"], "where": str(store),
            "mlflow_run_id": mlflow_id, "view": view_command("mlflow", store)}


def _to_tensorboard(project: Any, run: Any, metrics: list[Any], dest: Path | None) -> dict[str, Any]:
    if dest is None:
        runs_dir = project_folder(project) / "runs"
        target, shown = tensorboard_dir(config.child_path(runs_dir, run.folder)), runs_dir
    else:
        target = config.child_path(config.child_path(dest, project.folder), run.folder or f"run-{run.id}")
        shown = dest
    replaced = _check_replaceable(target)
    staging = target.with_name(f".{target.name}.export-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _write_events(staging, run, metrics)
        _swap(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"action": "replaced" if replaced else "created", "tracker": TITLES["tensorboard"],
            "where": str(target), "view": view_command("tensorboard", shown)}


def _check_replaceable(target: Path) -> bool:
    """True when ``target`` holds an earlier copy (only event files); an error when it holds
    anything else: an export never deletes what it did not write."""
    if not target.exists():
        return False
    if not target.is_dir():
        raise TrackerError(f"{target} is a file, not a TensorBoard log folder; move it away first")
    others = [p.name for p in target.iterdir() if not (p.is_file() and p.name.startswith(EVENTS_PREFIX))]
    if others:
        raise TrackerError(f"{target} holds other files than TensorBoard event files ({', '.join(sorted(others)[:3])}); "
                           "the export will not replace it: move them away or choose another --dest")
    return any(target.iterdir())


def _write_events(folder: Path, run: Any, metrics: list[Any]) -> None:
    try:  # as transformers' TensorBoardCallback: torch's writer, else tensorboardX's
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from tensorboardX import SummaryWriter
    folder.parent.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(log_dir=str(folder))
    try:
        writer.add_text("spec", "```\n" + json.dumps(run.spec or {}, indent=2) + "\n```", 0)
        for m in metrics:
            writer.add_scalar(tag_for(m.name), m.value, m.step, walltime=m.wall_time)
    finally:
        writer.close()


def tag_for(name: str) -> str:
    """A history metric's TensorBoard tag, as transformers' ``rewrite_logs`` names the live ones
    (``loss`` -> ``train/loss``, ``eval_loss`` -> ``eval/loss``), so live and exported runs
    share their charts. Ours: that function is private to transformers' integrations."""
    for prefix in ("eval_", "test_"):
        if name.startswith(prefix):
            return f"{prefix[:-1]}/{name[len(prefix):]}"
    return f"train/{name}"


def _swap(staging: Path, target: Path) -> None:
    """``staging`` becomes ``target``; an old ``target`` is renamed away first and removed last."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    try:
        staging.rename(target)
    except OSError:
        if old.exists():
            old.rename(target)  # put the earlier copy back
        raise
    shutil.rmtree(old, ignore_errors=True)
