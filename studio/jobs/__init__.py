"""Cluster jobs (issue 18): a run exported as a self-contained folder that trains anywhere with
``torchrun`` (or ``accelerate launch``) and SLURM, and brought back into the history once done.

A job folder holds ``job.json`` (the manifest: ``manifest.py``), ``README.txt``, ``launch.sh``
and ``job.sbatch`` (``templates.py``), and ``home/``: a studio home of its own, with a
``studio.db`` holding just the run's project, its dataset (the canonical rows as the studio
stores them) and the run, queued. The job's worker is the same ``python -m studio.worker RUN_ID``
as a local run's, with ``PEFT_STUDIO_HOME`` pointing at ``home/``: its metrics, heartbeats and
checkpoints land in the job folder, never in the user's history. That history is opened with a
rollback journal (``studio.db.engine.JOB_MARKER``), since WAL needs memory shared on one host.

``export.py`` writes a job, ``preflight.py`` runs on the first node before the launcher (the
model to use, checkpoint paths after the folder moved) and after a launcher that failed (the run
recorded failed, since no supervisor watches a job), ``importer.py`` copies a finished job's run
into a project. No torch is imported by any of them.
"""

from studio.jobs.manifest import JobError

__all__ = ["JobError"]
