"""``peft-studio job export`` and ``peft-studio job import``: a run trained on a cluster.

``job export RUN_ID --nodes N --gpus-per-node G [--dest DIR]`` writes a self-contained job
folder (``studio/jobs/export.py``) and prints where it is and how to start it; ``job import
FOLDER [--project P]`` brings the finished job's run into a project (``studio/jobs/importer.py``).
A refusal is one line, ``peft-studio job: <reason>``, and exit code 2; nothing was written.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    job = sub.add_parser("job", help="train a run on a cluster: export it as a job folder "
                                     "(torchrun / SLURM), import the finished job")
    jobs = job.add_subparsers(dest="job_command", required=True)
    ex = jobs.add_parser("export", help="write a run's spec, data and launch scripts as a job folder")
    ex.add_argument("run_id", type=int)
    ex.add_argument("--nodes", type=int, default=1, help="machines (default 1)")
    ex.add_argument("--gpus-per-node", type=int, default=1,
                    help="processes (GPUs) per machine (default 1)")
    ex.add_argument("--distributed", choices=("ddp", "fsdp", "zero2", "zero3"), default=None,
                    help="the job's strategy (default: the run's)")
    ex.add_argument("--offload", action="store_true", default=None,
                    help="FSDP / ZeRO: offload the sharded states to CPU memory")
    ex.add_argument("--dest", default=None,
                    help="a new or empty folder (default: the project's jobs/ folder)")
    ex.set_defaults(handler=export)
    im = jobs.add_parser("import", help="bring a finished job's run into a project")
    im.add_argument("folder", help="the job folder, copied back from the cluster")
    im.add_argument("--project", default=None,
                    help="the project to add the run to (default: the one it was exported from)")
    im.set_defaults(handler=import_)


def _fail(message: str) -> int:
    print(f"peft-studio job: {message}", file=sys.stderr, flush=True)
    return 2


def export(args: argparse.Namespace) -> int:
    from studio.db import Database
    from studio.jobs import JobError
    from studio.jobs.export import export_job

    db = Database()
    try:
        folder = export_job(db, args.run_id, args.nodes, args.gpus_per_node, args.dest,
                            distributed=args.distributed, offload=args.offload)
    except JobError as exc:
        return _fail(str(exc))
    print(f"job written to {folder}\n"
          f"  one machine:  {folder / 'launch.sh'}\n"
          f"  SLURM:        cd {folder} && sbatch job.sbatch\n"
          f"  each node:    {folder / 'launch.sh'} --rdzv-host FIRST_NODE --node-rank K\n"
          f"  when done:    peft-studio job import {folder}\n"
          f"(README.txt says more; the base model is set at the top of launch.sh)")
    return 0


def import_(args: argparse.Namespace) -> int:
    from studio.db import Database
    from studio.jobs import JobError
    from studio.jobs.importer import import_job

    db = Database()
    try:
        run = import_job(db, args.folder, args.project)
    except JobError as exc:
        return _fail(str(exc))
    project = db.get_project(run.project_id)
    print(f"imported as run {run.id} ('{run.name}', {run.status}) of project '{project.name}'")
    return 0
