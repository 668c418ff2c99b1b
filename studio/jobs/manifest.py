"""A job folder's layout and its manifest, ``job.json``: what was exported, from where, for how
many nodes and processes. Read by ``launch.sh``'s preflight, by ``job import``, and by a person.

Layout::

    <job>/job.json        this manifest
    <job>/README.txt      how to run it (three lines) and where to change the model
    <job>/launch.sh       torchrun (or accelerate launch) on one node; run it on every node
    <job>/job.sbatch      the same for SLURM: one task per node
    <job>/home/projects/  the job's studio home: studio.db, JOB, <project>/datasets, <project>/runs

Nothing in a manifest is trusted as a path: the folders it names are checked with
``config.child_path`` by whoever uses them.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from studio import config

JOB_FILE = "job.json"
HOME = "home"
WRITTEN_BY = "PEFT Studio job"
FORMAT = 1  # the layout's version; a later studio refuses a format it does not know
MAX_NODES = 4096  # far beyond any cluster a run is sent to; keeps the numbers meaningful
MAX_PER_NODE = 64  # RunSpec's nproc_per_node bound: processes (GPUs) on one machine
MANIFEST_MAX_BYTES = 1_000_000  # ours are a few hundred bytes; a bigger "manifest" is not ours


class JobError(ValueError):
    """A job that cannot be exported, launched or imported, with the reason a user can act on.
    Nothing was written (or what was written has been removed)."""


@dataclass(frozen=True)
class Manifest:
    job_id: str  # random, names the job: a second import of it is refused
    run_id: int  # the run's id, in the job's history and in the history it was exported from
    run_name: str
    project: str  # the project's name, where ``job import`` brings the run by default
    project_folder: str  # the project's folder inside home/projects
    run_folder: str  # the run's folder inside the project's runs/
    source_model: str  # the run's model as the exporting studio named it ("default", a path, a hub id)
    model: str  # what the job trains on: a hub id, or a local path (launch.sh's MODEL may change it)
    nodes: int
    gpus_per_node: int
    distributed: str  # "ddp", "fsdp", "zero2", "zero3"
    created_at: str  # ISO 8601, UTC
    studio_version: str
    written_by: str = WRITTEN_BY
    format: int = FORMAT

    def save(self, folder: Path) -> Path:
        path = folder / JOB_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: Path) -> "Manifest":
        """The manifest of job folder ``folder``; ``JobError`` saying why it is not a job."""
        path = folder / JOB_FILE
        if not folder.is_dir():
            raise JobError(f"{folder} is not a folder; give the folder `peft-studio job export` wrote")
        if path.is_symlink() or not path.is_file():
            raise JobError(f"{folder} is not a PEFT Studio job folder: it has no {JOB_FILE} (a job "
                           "folder is what `peft-studio job export` writes)")
        try:
            if path.stat().st_size > MANIFEST_MAX_BYTES:
                raise ValueError("too large")
            data: Any = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise JobError(f"{path} cannot be read as a job manifest ({exc})") from None
        if not isinstance(data, dict) or data.get("written_by") != WRITTEN_BY:
            raise JobError(f"{path} is not a PEFT Studio job manifest (no \"written_by\": "
                           f"\"{WRITTEN_BY}\")")
        if data.get("format") != FORMAT:
            raise JobError(f"{path} is a job of format {data.get('format')!r}; this PEFT Studio "
                           f"reads format {FORMAT}: import it with the version that exported it")
        known = {f.name for f in fields(cls)}
        try:
            manifest = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise JobError(f"{path}: a field is missing ({exc})") from None
        manifest.check(path)
        return manifest

    def check(self, path: Path) -> None:
        """The types and ranges, so that nothing below meets a string where a number belongs."""
        for name in ("run_id", "nodes", "gpus_per_node"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise JobError(f"{path}: {name} must be a whole number from 1 (got {value!r})")
        for name in ("job_id", "run_name", "project", "project_folder", "run_folder",
                     "source_model", "model", "distributed"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise JobError(f"{path}: {name} must be a non-empty string")
        for name in ("project_folder", "run_folder"):  # plain names, never a path out of home/
            try:
                config.child_path(Path("/"), getattr(self, name))
            except ValueError as exc:
                raise JobError(f"{path}: {name}: {exc}") from None


def check_shape(nodes: Any, gpus_per_node: Any) -> None:
    """``--nodes`` and ``--gpus-per-node``, each refused by name with what is accepted."""
    for name, value, high in (("nodes", nodes, MAX_NODES), ("gpus-per-node", gpus_per_node, MAX_PER_NODE)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            raise JobError(f"--{name}: a whole number from 1 to {high:,} (got {value!r})")


def projects_of(job: Path) -> Path:
    """The job home's ``projects`` folder (studio.db and the project folders)."""
    return job / HOME / "projects"


def run_dir(job: Path, manifest: Manifest) -> Path:
    """The run's folder inside the job home, confined to it."""
    project = config.child_path(projects_of(job), manifest.project_folder)
    return config.child_path(project / "runs", manifest.run_folder)


def copy_without_links(source: Path, dest: Path, refusal: str) -> None:
    """``source`` copied to ``dest``, refused (``JobError``: the link, then ``refusal``) when it
    holds a link: the studio writes none in a run or dataset folder, and a link in a folder that
    travels would point into this machine or out of the folder."""
    for root, dirs, files in os.walk(source):
        for name in dirs + files:
            if (Path(root) / name).is_symlink():
                raise JobError(f"{Path(root) / name} is a link; {refusal}")
    shutil.copytree(source, dest)
