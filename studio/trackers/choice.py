"""Which experiment trackers a run may log to, whether their packages are installed, where their
logs go and how to view them. No tracker is imported here (the RunSpec check and the Train tab
ask without paying for mlflow's or tensorboard's import).

Places, one rule for the live logging (``live.py``) and ``runs export`` (``export.py``):
TensorBoard event files in ``<run folder>/tensorboard`` (so ``tensorboard --logdir
<project>/runs`` shows every run of a project), MLflow in a local SQLite store per project,
``<project folder>/mlflow/mlflow.db``, experiment = the project's name, run = the run's name.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from studio import config

TRACKERS = ("tensorboard", "mlflow")
TITLES = {"tensorboard": "TensorBoard", "mlflow": "MLflow"}
EXTRA = 'pip install "peft-studio[trackers]"'
# What each tracker needs importable here, and the plain pip line for it. MLflow's local store is
# SQLite through SQLAlchemy + alembic (its file store refuses new use since 3.x); mlflow-skinny
# (no UI server) is enough to log and to read back. Writing TensorBoard events needs tensorboard
# (torch.utils.tensorboard) or tensorboardX, as transformers' callback; viewing needs tensorboard.
NEEDS = {"tensorboard": (("tensorboard", "tensorboardX"), "pip install tensorboard"),
         "mlflow": (("mlflow", "alembic"), "pip install mlflow-skinny alembic")}
MLFLOW_DIR = "mlflow"  # in the project folder
TENSORBOARD_DIR = "tensorboard"  # in the run folder
RUN_TAG = "peft_studio.run_id"  # the MLflow tag that makes an export idempotent
PROJECT_TAG = "peft_studio.project"


class TrackerError(ValueError):
    """A tracker that cannot be used: an unknown name, a missing package, an unwritable place."""


def missing(name: str) -> str | None:
    """None when ``name`` can log here; else what is missing and how to install it."""
    modules, pip = NEEDS[name]
    if name == "tensorboard":  # either writer will do
        absent = [] if any(_installed(m) for m in modules) else [modules[0]]
    else:
        absent = [m for m in modules if not _installed(m)]
    if not absent:
        return None
    return f"{TITLES[name]} needs {' and '.join(absent)}, not installed here: {EXTRA} (or {pip})"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken install counts as absent
        return False


def problem(value: Any) -> str | None:
    """Why ``value`` is not a valid RunSpec ``trackers`` list, or None. Checks the shape, the
    names (each once) and that each package is installed."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return f"must be a list of tracker names, from {', '.join(TRACKERS)}"
    unknown = [v for v in value if v not in TRACKERS]
    if unknown:
        return f"unknown tracker {unknown[0]!r}: choose from {', '.join(TRACKERS)}"
    if len(set(value)) != len(value):
        return "names a tracker twice"
    for name in value:
        why = missing(name)
        if why:
            return why
    return None


def known(name: str) -> str:
    """``name`` when it is a tracker; a ``TrackerError`` naming the accepted ones otherwise."""
    if name not in TRACKERS:
        raise TrackerError(f"unknown tracker {name!r}: choose from {', '.join(TRACKERS)}")
    return name


def require(name: str) -> None:
    why = missing(known(name))
    if why:
        raise TrackerError(why)


def project_folder(project: Any) -> Path:
    return config.child_path(config.projects_dir(), project.folder)


def mlflow_store(project_dir: Path) -> Path:
    """The folder of a project's MLflow store (``mlflow.db`` and ``artifacts/`` inside)."""
    return project_dir / MLFLOW_DIR


def mlflow_uri(store: Path) -> str:
    """The SQLAlchemy URI of the store's database: ``sqlite:////abs/path/mlflow.db``."""
    return "sqlite:///" + (Path(store).resolve() / "mlflow.db").as_posix()


def tensorboard_dir(run_folder: Path) -> Path:
    return run_folder / TENSORBOARD_DIR


def view_command(name: str, where: Path) -> str:
    """The command that shows ``where`` (a TensorBoard log folder or an MLflow store folder)."""
    if name == "tensorboard":
        return f'tensorboard --logdir "{where}"'
    return f'mlflow ui --backend-store-uri "{mlflow_uri(where)}"'


# What a viewer needs beyond the extra: mlflow-skinny has no UI server.
VIEW_NOTES = {"mlflow": "the MLflow UI needs the full package: pip install mlflow"}


def view_line(name: str, where: Path) -> str:
    """The view command with what it needs, for people (``view_command`` alone for scripts)."""
    note = VIEW_NOTES.get(name)
    return view_command(name, where) + (f"  ({note})" if note else "")


def run_places(project: Any, run: Any, trackers: list[str]) -> list[tuple[str, Path, str, str]]:
    """(title, where, view command, what the viewer needs or "") for each tracker a run logs
    to; TensorBoard's command covers the project's runs folder, so one viewer shows them all."""
    folder = project_folder(project)
    out = []
    for name in trackers:
        if name == "tensorboard":
            runs_dir = folder / "runs"
            where, shown = tensorboard_dir(runs_dir / (run.folder or "")), runs_dir
        elif name == "mlflow":
            where = shown = mlflow_store(folder)
        else:
            continue
        out.append((TITLES[name], where, view_command(name, shown), VIEW_NOTES.get(name, "")))
    return out
