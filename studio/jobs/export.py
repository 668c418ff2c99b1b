"""``peft-studio job export RUN_ID --nodes N --gpus-per-node G [--dest DIR]``: a run's spec as a
self-contained job folder (layout in ``manifest.py``).

Any run that was trained (not a composed adapter) can be exported, whatever its status: the job
is its spec trained afresh on the cluster, and the run itself is left as it is. What goes in:

- ``home/projects/studio.db`` (with ``JOB``: a rollback journal), holding the project, the run's
  dataset row and the run, queued, with the same ids as here (so the spec's ``dataset_id`` holds);
  the dataset's folder (canonical rows, as the studio stores them) and the run folder with
  ``runspec.json``. A run on a sample task gets the task imported into its project here first
  (what its first local run would do) and named in the job's spec, so that no rank imports.
- the model by reference, not by copy: the hub id when the model has one (``export/card.py``'s
  rule: the embedded model is SmolLM2-135M-Instruct on the hub), else this machine's path.
- for FSDP / ZeRO, the accelerate config (and DeepSpeed's JSON) that ``studio.distributed.strategy``
  writes, in the job's run folder.

The folder is built in a hidden sibling and renamed into place in one step: an export that fails
leaves nothing. The destination is the project's ``jobs/`` folder unless ``--dest`` names one;
an existing destination is used only when it is an empty folder: nothing is ever overwritten.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import studio
from studio import config
from studio.db import Database, Dataset, Project, Run, RunStatus
from studio.db.engine import JOB_MARKER
from studio.jobs import templates
from studio.jobs.manifest import (JobError, Manifest, check_shape, copy_without_links, projects_of,
                                  run_dir)

JOBS_FOLDER = "jobs"  # inside the project's folder: the default destination


def export_job(db: Database, run_id: int, nodes: int = 1, gpus_per_node: int = 1,
               dest: str | None = None, distributed: str | None = None,
               offload: bool | None = None) -> Path:
    """Writes the job folder; returns its path. ``JobError`` (nothing written) when it cannot.
    ``distributed`` / ``offload`` set the job's strategy in place of the run's: a run made here
    (on a CPU, where FSDP and ZeRO are refused) goes to the cluster sharded."""
    from studio.projects import project_dir
    from studio.runspec import RunSpec, RunSpecError

    check_shape(nodes, gpus_per_node)
    run = db.get_run(run_id)
    if run is None:
        raise JobError(f"there is no run {run_id} in the history {db.path}")
    if run.recipe is not None:
        raise JobError(f"run {run_id} ('{run.name}') is a composed adapter, made from other runs "
                       "without training: there is nothing to train on a cluster")
    project = db.get_project(run.project_id)
    try:
        source = RunSpec.from_dict(dict(run.spec)).validate()
    except RunSpecError as exc:
        raise JobError(f"run {run_id}'s spec cannot be trained by this version: {exc}") from None
    strategy = {k: v for k, v in (("distributed", distributed), ("offload", offload)) if v is not None}
    if strategy:
        try:  # nproc_per_node is the job's (below); the strategy's own rules are checked here
            source = dataclasses.replace(source, nproc_per_node=max(2, source.nproc_per_node),
                                         **strategy).validate()
        except RunSpecError as exc:
            raise JobError(str(exc)) from None
    model, on_hub = model_reference(source.model)
    spec = _job_spec(source, model, nodes, gpus_per_node)
    target = _destination(project_dir(project), run, nodes, gpus_per_node, dest)  # before any write
    dataset = _dataset(db, project, spec)
    spec = dataclasses.replace(spec, dataset_id=dataset.id)
    manifest = Manifest(
        job_id=f"job-{uuid.uuid4().hex[:12]}", run_id=run.id, run_name=run.name, project=project.name,
        project_folder=project.folder, run_folder=run.folder or "", source_model=source.model,
        model=model, nodes=nodes, gpus_per_node=gpus_per_node,
        distributed=spec.distributed,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        studio_version=studio.__version__)
    if not manifest.run_folder:
        raise JobError(f"run {run_id} has no folder in the history; it cannot be exported")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_home(db, work, manifest, project, dataset, run, spec)
        _write_strategy(work, manifest, source)
        manifest.save(work)
        (work / "README.txt").write_text(templates.readme(manifest, on_hub), encoding="utf-8")
        (work / "job.sbatch").write_text(templates.sbatch(manifest), encoding="utf-8")
        launch = work / "launch.sh"
        launch.write_text(templates.launch_sh(manifest), encoding="utf-8")
        launch.chmod(launch.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        if target.is_dir():  # an empty folder the user made: rmdir refuses one that is not empty
            target.rmdir()
        os.rename(work, target)  # same parent folder: one step
    finally:
        shutil.rmtree(work, ignore_errors=True)  # gone already once in place
    return target


def model_reference(source: str) -> tuple[str, bool]:
    """(what the job names the model by, whether it is a hub id): the hub id when there is one
    (the embedded model's too), else the absolute path of the folder or .gguf file here."""
    from studio import models
    from studio.export.card import EMBEDDED_HUB_ID

    try:
        parsed = models.parse_source(source)
    except models.ModelSourceError as exc:
        raise JobError(f"the run's model cannot be named for the job: {exc}") from None
    if parsed.kind == "default":
        return EMBEDDED_HUB_ID, True
    return parsed.ref, parsed.kind == "hub"


def _job_spec(source: Any, model: str, nodes: int, gpus_per_node: int) -> Any:
    """The run's spec as the job trains it: the model by reference, and the job's processes per
    machine (``nproc_per_node``; 0, "one per GPU", where it is 1 but the strategy shards over
    several machines: RunSpec refuses a sharding strategy with ``nproc_per_node`` 1)."""
    if source.distributed != "ddp" and nodes * gpus_per_node == 1:
        raise JobError(f"runspec 'distributed': {source.distributed} shards the model across processes, "
                       "and a job of 1 node x 1 GPU has one: ask for more (--nodes, --gpus-per-node), "
                       "or train the run with ddp")
    per_node = 0 if gpus_per_node == 1 and source.distributed != "ddp" else gpus_per_node
    return dataclasses.replace(source, model=model, nproc_per_node=per_node)


def _dataset(db: Database, project: Any, spec: Any) -> Any:
    """The dataset row the job trains on (a sample task imported into the project when it has
    never been: reused when it has)."""
    if spec.dataset_id is not None:
        row = db.get_dataset(spec.dataset_id)
        if row is None or row.project_id != project.id:
            raise JobError(f"dataset_id: project '{project.name}' has no dataset {spec.dataset_id}")
        return row
    from studio.data import import_sample_task

    return import_sample_task(db, project, spec.sample_task).dataset


def _destination(project_folder: Path, run: Any, nodes: int, gpus: int, dest: str | None) -> Path:
    if dest is None:
        root = project_folder / JOBS_FOLDER
        base = f"{run.folder}-{nodes}x{gpus}"
        name, n = base, 1
        while (root / name).exists() or (root / name).is_symlink():
            n += 1
            name = f"{base}-{n}"
        return config.child_path(root, name)
    try:
        target = Path(dest.strip()).expanduser().resolve()
    except (ValueError, OSError, RuntimeError) as exc:
        raise JobError(f"--dest {dest!r} is not a usable folder path ({exc})") from None
    if target.parent == target:
        raise JobError(f"--dest {target} is the root of the file system; name a new folder")
    projects = config.projects_dir().resolve()
    if target.is_relative_to(projects) and not target.is_relative_to(project_folder.resolve() / JOBS_FOLDER):
        raise JobError(f"--dest {target} lies inside the studio's projects folder {projects}, which "
                       f"only the studio writes; name a folder outside it (or leave --dest out: "
                       f"{project_folder / JOBS_FOLDER})")
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise JobError(f"--dest {target} is a file or a link, not a folder; name a new folder")
    if target.is_dir() and any(target.iterdir()):
        raise JobError(f"--dest {target} already holds files; a job is written only into a new or "
                       "empty folder, never over anything")
    return target


def _write_home(db: Database, work: Path, m: Manifest, project: Any, dataset: Any, run: Any,
                spec: Any) -> None:
    """The job's studio home: its history (rows with this history's ids) and files."""
    projects = projects_of(work)
    projects.mkdir(parents=True)
    (projects / JOB_MARKER).write_text(
        "A PEFT Studio job's history: SQLite's rollback journal instead of WAL (shared file systems).\n",
        encoding="utf-8")  # before the history is opened: it decides the journal mode
    job_db = Database(projects / "studio.db")
    try:
        with job_db.session() as s:  # flushed one by one: the foreign keys need that order
            s.add(Project(id=project.id, name=project.name, folder=project.folder, model_source=m.model,
                          notes=f"Cluster job {m.job_id}, exported from {db.path}"))
            s.flush()
            if dataset is not None:
                s.add(Dataset(**{k: v for k, v in dataset.to_dict().items()}))
                s.flush()
            s.add(Run(id=run.id, project_id=project.id, dataset_id=dataset.id if dataset else None,
                      name=run.name, method=run.method, spec=spec.to_dict(),
                      status=RunStatus.QUEUED.value, folder=run.folder, notes=run.notes or ""))
    finally:
        job_db.close()
    if dataset is not None:
        from studio.data.store import dataset_dir

        here = config.child_path(projects / project.folder / "datasets", dataset.folder)
        copy_without_links(dataset_dir(db, dataset.id), here,
                           "the studio writes none there, so it is not copied into a job")
    folder = run_dir(work, m)
    folder.mkdir(parents=True)
    spec.save(folder / "runspec.json")


def _write_strategy(work: Path, m: Manifest, source: Any) -> None:
    """FSDP / ZeRO: the accelerate config (and DeepSpeed's JSON) in the job's run folder, written
    by the studio's strategy module for the cluster's GPUs from the run's spec (with its model as
    named here, which this machine can read for FSDP's wrap unit)."""
    if m.distributed == "ddp":
        return
    from studio.distributed import strategy

    try:
        strategy.export_configs(source, run_dir(work, m), m.nodes, m.gpus_per_node)
    except (strategy.StrategyError, ValueError) as exc:  # LayerClassError is a ValueError
        raise JobError(str(exc)) from None


