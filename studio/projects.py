"""Projects as the user sees them: a history row plus a folder under ``projects/``.

The database row and the folder are created and removed together here, so neither the UI nor
the CLI can leave one without the other (a row whose folder could not be made is rolled back).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from studio import config
from studio.db import Database, Project

STARTER_PROJECT = "My first project"


def project_dir(project: Project) -> Path:
    return config.child_path(config.projects_dir(), project.folder)


def create_project(db: Database, name: str, model_source: str = config.DEFAULT_MODEL) -> Project:
    project = db.create_project(name, model_source=model_source)
    _make_folder(db, project, exist_ok=False)
    return project


def _make_folder(db: Database, project: Project, exist_ok: bool) -> None:
    """The new project's folder; if it cannot be made, the row goes too (never one without the
    other)."""
    try:
        project_dir(project).mkdir(parents=True, exist_ok=exist_ok)
    except Exception:
        db.delete_project(project.id)
        raise


def get_or_create_project(db: Database, name: str, model_source: str = config.DEFAULT_MODEL) -> Project:
    """The project named ``name``, made (row and folder) if new. Safe when two processes (two
    ``peft-studio train --project NEW``) ask at once: both get the same project."""
    found = db.get_project_by_name(name)  # a read first: no write lock for the common case
    if found is not None:
        return found
    project, created = db.get_or_create_project(name, model_source=model_source)
    if created:
        # exist_ok: the folder name was free when the row was made, so if it exists now it was
        # made by another process that read our row and is creating a run inside it.
        _make_folder(db, project, exist_ok=True)
    return project


def delete_project(db: Database, project_id: int) -> None:
    project = db.get_project(project_id)
    if project is None:
        raise ValueError(f"no project with id {project_id}")
    folder = project_dir(project)
    db.delete_project(project_id)
    shutil.rmtree(folder, ignore_errors=True)


def ensure_starter_project(db: Database) -> Project:
    """On a fresh install, one project on the embedded model so the app opens ready to use."""
    existing = db.list_projects()
    if existing:
        return existing[0]
    return create_project(db, STARTER_PROJECT)
