"""``peft-studio job import FOLDER [--project P]``: a finished job's run as a new run of a project.

What is brought home: the run's row (name, method, spec, status, error and its times), every
metric with its step and wall time, the checkpoints still on disk, the final adapter, the logs
and the rest of the run folder (precision.json, the written accelerate config); and the job's
dataset (a new dataset of the project) when the project has no copy of it (by content hash), so
that the run can be resumed or cloned like a local one. The new run is
an ordinary local run: History, Compare, Export and Serve list it; its ``job.json`` (the job's
manifest) names the job it came from, and its notes say so in words.

Refused, each with the reason, and nothing written: a folder that is not a job; a job that has
not finished (queued, running or killed, failed); a job stopped without a checkpoint; a job whose
base model is not the project's; a job already imported (its ``job_id`` in a run folder of this
history). The run folder is built in a hidden folder inside the project's ``runs/``, and the row,
its metrics and checkpoints are recorded in one transaction that also renames the folder into
place (as ``studio.adapters.compose`` places a composed adapter): a failure leaves no row and
no folder. ``--project`` defaults to the project the run was exported from (by id and folder,
so a rename does not matter; else by name; created on the job's model when there is none).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from studio import config
from studio.db import Checkpoint, Database, Dataset, Metric, Run, RunStatus
from studio.db.engine import JOB_MARKER
from studio.jobs.manifest import JOB_FILE, JobError, Manifest, copy_without_links, projects_of

WORK_PREFIX = ".job-import-"


def import_job(db: Database, folder: str | Path, project: str | None = None) -> Run:
    """Imports the job in ``folder``; returns the new run. ``JobError`` (nothing written) if not."""
    job = Path(folder).expanduser().resolve()
    manifest = Manifest.load(job)
    found = _read_job(job, manifest)
    target, created = _project(db, project, manifest, found["run"].project_id)
    try:
        _check_base(target, manifest, found["run"])
        _check_not_imported(db, manifest)
        return _place(db, target, job, manifest, found)
    except BaseException:
        if created:  # made for this import only: it goes with it
            from studio.projects import delete_project

            delete_project(db, target.id)
        raise


def _read_job(job: Path, manifest: Manifest) -> dict[str, Any]:
    """The job's run, metrics, checkpoints and dataset row, read from its history (then closed)."""
    from studio.db import DatabaseError

    projects = projects_of(job)
    path = projects / "studio.db"
    if not path.is_file() or not (projects / JOB_MARKER).is_file():
        raise JobError(f"{job} is not a complete PEFT Studio job folder: {path} or its {JOB_MARKER} "
                       "marker is missing")
    try:
        job_db = Database(path)
    except DatabaseError as exc:
        raise JobError(f"the job's history cannot be opened: {exc}") from None
    try:
        run = job_db.get_run(manifest.run_id)
        if run is None:
            raise JobError(f"the job's history has no run {manifest.run_id}; the folder is damaged")
        _check_finished(job, run)
        return {"run": run, "metrics": job_db.metrics_for(run.id),
                "checkpoints": job_db.list_checkpoints(run.id),
                "dataset": job_db.get_dataset(run.dataset_id) if run.dataset_id else None,
                "project_folder": job_db.get_project(run.project_id).folder}
    finally:
        job_db.close()


def _check_finished(job: Path, run: Run) -> None:
    status = run.status
    if status == RunStatus.QUEUED.value:
        raise JobError(f"job run {run.id} has not run yet: start it with launch.sh or job.sbatch in "
                       f"{job}, then import it once it has finished")
    if status == RunStatus.RUNNING.value:
        raise JobError(f"job run {run.id} is still running (or its launcher was killed: then "
                       "`./launch.sh --resume` continues it); import it once it has finished")
    if status not in (RunStatus.COMPLETED.value, RunStatus.CANCELLED.value):
        first = (run.error or "").strip().splitlines()[:1]
        raise JobError(f"job run {run.id} {status}" + (f" ({first[0][:200]})" if first else "")
                       + "; only a completed job, or one stopped with a checkpoint, is imported "
                       "(fix it and continue it with `./launch.sh --resume`)")


def _project(db: Database, name: str | None, manifest: Manifest, exported_id: int) -> tuple[Any, bool]:
    """The project to import into, and whether it was created for this import: ``name``; by
    default the project the run was exported from (its id and folder, so a rename since does
    not matter; else by name), created on the job's model when this history has neither."""
    from studio import projects

    if name is None:
        origin = db.get_project(exported_id)
        if origin is not None and origin.folder == manifest.project_folder:
            return origin, False
        name = manifest.project
    found = db.get_project_by_name(name)
    if found is not None:
        return found, False
    try:
        return projects.create_project(db, name, model_source=manifest.source_model), True
    except ValueError as exc:
        raise JobError(f"--project: {exc}") from None


def _check_base(target: Any, manifest: Manifest, run: Run) -> None:
    """The project's model is the job's: the model the run was exported with (as this studio
    names it), or the same hub id the job trained on."""
    from studio.export.card import base_model_reference
    from studio.serve.catalog import same_source

    trained = str((run.spec or {}).get("model", manifest.model))
    if same_source(target.model_source, manifest.source_model):
        return
    mine, mine_on_hub = base_model_reference(target.model_source)
    theirs, theirs_on_hub = base_model_reference(trained)
    if mine_on_hub and theirs_on_hub and mine == theirs:
        return
    raise JobError(f"the job trained on {trained} (exported from a run on {manifest.source_model}), "
                   f"but project '{target.name}' is on {target.model_source}: its adapter belongs "
                   "to another base model; import it into a project on that model (--project)")


def _check_not_imported(db: Database, manifest: Manifest) -> None:
    """No run of this history came from the same job (its job.json in the run's folder)."""
    from studio.runs.launch import RunFolderError, run_folder

    for run in db.list_runs():
        try:
            path = run_folder(db, run) / JOB_FILE if run.folder else None
        except RunFolderError:
            continue
        if path is None or not path.is_file():
            continue
        try:
            job_id = json.loads(path.read_text(encoding="utf-8")).get("job_id")
        except (OSError, ValueError, AttributeError):
            continue
        if job_id == manifest.job_id:
            project = db.get_project(run.project_id)
            raise JobError(f"job {manifest.job_id} was already imported, as run {run.id} ('{run.name}') "
                           f"of project '{project.name}'; delete that run to import it again")


def _place(db: Database, target: Any, job: Path, manifest: Manifest, found: dict[str, Any]) -> Run:
    from studio.projects import project_dir
    from studio.runs.launch import folder_name, runs_root

    run = found["run"]
    source = config.child_path(config.child_path(projects_of(job), found["project_folder"]) / "runs",
                               run.folder or "")
    completed = run.status == RunStatus.COMPLETED.value
    if completed and not (source / "adapter").is_dir():
        raise JobError(f"job run {run.id} completed but {source / 'adapter'} is missing; the folder "
                       "is incomplete (copy all of it back from the cluster)")
    on_disk = {Path(c.path).name: c for c in found["checkpoints"]
               if (source / "checkpoints" / Path(c.path).name).is_dir()}
    if not completed and not on_disk:
        raise JobError(f"job run {run.id} was stopped without a checkpoint: there is nothing trained "
                       "to import")
    spec = _local_spec(db, target, run, found["dataset"])
    data = _dataset_to_copy(job, found) if spec["dataset_id"] is None else None
    root = runs_root(db, target.id)
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir=root))
    placed: list[Path] = []
    try:
        copy_without_links(source, work / "run", "a job's folders hold none, so the job is not imported")
        if data is not None:
            copy_without_links(data, work / "dataset", "a job's folders hold none, so the job is not imported")
        (work / "run" / JOB_FILE).write_text(json.dumps(
            {**json.loads((job / JOB_FILE).read_text(encoding="utf-8")), "imported_from": str(job)},
            indent=2) + "\n", encoding="utf-8")
        with db.session() as s:
            s.connection()  # BEGIN IMMEDIATE now: the check below runs under the write lock
            _check_not_imported(db, manifest)  # again: two imports of one job at once
            moves = []
            if data is not None:  # the project has no copy of the job's dataset: it gets one
                datasets = project_dir(target) / "datasets"
                copy = found["dataset"].to_dict()
                dataset_row = Dataset(**{k: v for k, v in copy.items() if k not in ("id", "project_id", "folder")},
                                      project_id=target.id, folder=_free_name(datasets, found["dataset"].folder))
                s.add(dataset_row)
                s.flush()
                spec["dataset_id"] = dataset_row.id
                moves.append((work / "dataset", config.child_path(datasets, dataset_row.folder)))
            row = Run(project_id=target.id, dataset_id=spec["dataset_id"], name=run.name,
                      method=run.method, spec=spec, status=run.status, created_at=run.created_at,
                      started_at=run.started_at, finished_at=run.finished_at,
                      heartbeat_at=run.heartbeat_at, error=run.error, exit_code=run.exit_code,
                      notes=_notes(run, manifest, job))
            s.add(row)
            s.flush()  # the id names the folder
            folder = folder_name(row.id, run.name)
            dest = config.child_path(root, folder)
            s.add_all(Metric(run_id=row.id, step=m.step, name=m.name, value=m.value,
                             wall_time=m.wall_time) for m in found["metrics"])
            s.add_all(Checkpoint(run_id=row.id, step=c.step, created_at=c.created_at,
                                 path=str(dest / "checkpoints" / name)) for name, c in on_disk.items())
            row.folder = folder
            s.flush()
            (work / "run" / "runspec.json").write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
            moves.append((work / "run", dest))
            for here, there in moves:
                if there.exists() or there.is_symlink():  # a leftover: never ours to replace
                    raise JobError(f"the folder {there} already exists; move it aside and import again")
                there.parent.mkdir(parents=True, exist_ok=True)
                os.rename(here, there)  # same file system (inside the project): one step
                placed.append(there)
    except BaseException:
        for there in placed:  # the rows did not commit: their folders go too
            shutil.rmtree(there, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return db.get_run(row.id)


def _local_spec(db: Database, target: Any, run: Run, dataset: Any) -> dict[str, Any]:
    """The job's spec as this project knows it: the project's model (the same base, checked), the
    project's copy of the dataset (same content hash), else None (``_dataset_to_copy``), and
    processes "automatic" (one per GPU here): the cluster's count stays in the notes and job.json,
    and a Resume or Clone here must not start a cluster node's worth of processes."""
    spec = dict(run.spec or {})
    spec["model"] = target.model_source
    if "nproc_per_node" in spec:
        spec["nproc_per_node"] = 0
    local = None
    if dataset is not None and dataset.source_hash:
        local = db.find_dataset_by_hash(target.id, dataset.source_hash)
    spec["dataset_id"] = local.id if local is not None else None
    return spec


def _dataset_to_copy(job: Path, found: dict[str, Any]) -> Path | None:
    """The job's dataset folder, brought along when the project has no copy of it, so that the
    imported run can be resumed or cloned here like a local one; None when the job has none."""
    dataset = found["dataset"]
    if dataset is None or not dataset.folder:
        return None
    folder = config.child_path(config.child_path(projects_of(job), found["project_folder"]) / "datasets",
                               dataset.folder)
    return folder if folder.is_dir() else None


def _free_name(root: Path, name: str) -> str:
    """``name``, or ``name-2``, ``name-3``...: the first not taken in ``root``."""
    candidate, n = name, 1
    while (root / candidate).exists() or (root / candidate).is_symlink():
        n += 1
        candidate = f"{name}-{n}"
    return config.child_path(root, candidate).name


def _notes(run: Run, manifest: Manifest, job: Path) -> str:
    line = (f"Trained as cluster job {manifest.job_id} ({manifest.nodes} node(s) x "
            f"{manifest.gpus_per_node} process(es), {manifest.distributed}, on {manifest.model}); "
            f"imported from {job}.")
    return f"{run.notes}\n{line}".strip() if run.notes else line
