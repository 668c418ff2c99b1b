"""Where the studio keeps its files, and the defaults every part shares.

Everything user-made lives under ``<home>/projects/``. ``<home>`` is the checkout (the folder
holding ``launcher.py``) unless the environment variable ``PEFT_STUDIO_HOME`` names another
folder; tests point it at a temporary folder. Imports nothing but the standard library.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

HOME_ENV = "PEFT_STUDIO_HOME"
PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent

DEFAULT_MODEL = "default"  # the embedded SmolLM2-135M-Instruct
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def studio_home() -> Path:
    """The folder that holds ``projects/``."""
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser().resolve()
    if (REPO_ROOT / "launcher.py").exists():
        return REPO_ROOT
    return Path.home() / ".peft-studio"


def projects_dir() -> Path:
    path = studio_home() / "projects"
    path.mkdir(parents=True, exist_ok=True)
    return path


def db_path() -> Path:
    return projects_dir() / "studio.db"


def models_dir() -> Path:
    path = projects_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def model_fact_file(source: str, suffix: str) -> Path:
    """Where a fact read from model ``source`` is cached (``models/arch/<hash><suffix>``): keyed
    by the folder's real path (a moved folder is the same model) or by the hub id."""
    import hashlib

    path = Path(source).expanduser()
    key = str(path.resolve()) if path.exists() else source
    folder = models_dir() / "arch"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}{suffix}"


def model_stamp(source: str) -> float:
    """The mtime of a local model's config (0 for a hub id), so a cached fact is re-read after
    config.json is edited."""
    path = Path(source).expanduser()
    target = path / "config.json" if path.is_dir() else path
    return target.stat().st_mtime if target.exists() else 0.0


def assets_dir() -> Path:
    return REPO_ROOT / "assets"


_SLUG_BAD = re.compile(r"[^a-z0-9]+")


def slugify(name: str, max_len: int = 48) -> str:
    """A folder-safe form of a user-typed name: lowercase ASCII letters, digits and dashes."""
    slug = _SLUG_BAD.sub("-", name.lower()).strip("-")[:max_len].strip("-")
    return slug or "item"


def child_path(parent: Path, name: str) -> Path:
    """``parent / name``, refusing any name that would land outside ``parent``.

    User-supplied names never become paths unchecked: '..', absolute paths and separators are
    rejected here rather than trusted.
    """
    if not name or name in {".", ".."} or "/" in name or "\\" in name or "\x00" in name:
        raise ValueError(f"not a plain folder or file name: {name!r}")
    parent = parent.resolve()
    path = (parent / name).resolve()
    if path.parent != parent:
        raise ValueError(f"{name!r} would leave {parent}")
    return path
