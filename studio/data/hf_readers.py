"""Sources read by ``datasets`` itself: a Parquet file, a folder written by ``save_to_disk`` and a
Hugging Face Hub dataset id (only when the studio is online). Each failure becomes a
``DataError`` naming the file and what was expected, never a library traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

import datasets

from .. import config
from .errors import EmptyFileError, UnreadableFileError
from .source import Source, short_error


def read_parquet(path: Path, display: str, work_dir: Path) -> Source:
    try:
        dataset = datasets.Dataset.from_parquet(str(path), cache_dir=str(work_dir / "hf"))
    except Exception as exc:  # pyarrow raises many types for a corrupt file
        raise UnreadableFileError(f"not a readable Parquet file ({short_error(exc)})", file=display,
                                  code="unreadable") from None
    if len(dataset) == 0:
        raise EmptyFileError("the Parquet file holds no rows", file=display, code="empty")
    return Source(dataset, display, "parquet", columns=list(dataset.column_names))


def read_folder(path: Path) -> Source:
    display = path.name
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # FileNotFoundError, ArrowInvalid, JSON errors in the metadata
        raise UnreadableFileError("this folder is not a dataset saved with datasets' "
                                  f"save_to_disk ({short_error(exc)})", file=display,
                                  code="unreadable") from None
    note = ""
    if isinstance(loaded, datasets.DatasetDict):
        split = "train" if "train" in loaded else next(iter(loaded), None)
        if split is None:
            raise EmptyFileError("the saved dataset has no splits", file=display, code="empty")
        note = f"the folder holds splits {', '.join(loaded)}; the {split!r} split is used"
        loaded = loaded[split]
    if len(loaded) == 0:
        raise EmptyFileError("the saved dataset holds no rows", file=display, code="empty")
    return Source(loaded, display, "folder", note=note, columns=list(loaded.column_names))


def hub_offline() -> bool:
    flags = (os.environ.get(name, "") for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(value.strip().upper() in {"1", "ON", "YES", "TRUE"} for value in flags)


def read_hub(repo_id: str, work_dir: Path) -> Source:
    repo_id = repo_id.removeprefix("hf://datasets/")
    if hub_offline():
        raise UnreadableFileError(
            "this is not a file or folder here, and as a Hugging Face Hub dataset id it can't "
            "be reached: the studio is offline (HF_HUB_OFFLINE is set). Check the path, or "
            "download the dataset on a connected machine (datasets.load_dataset(...)."
            "save_to_disk(folder)) and import that folder", file=repo_id, code="offline")
    cache = config.projects_dir() / ".cache" / "hub-datasets"  # kept: re-imports reuse it
    try:
        loaded = datasets.load_dataset(repo_id, split="train", cache_dir=str(cache))
    except Exception as exc:  # not found, gated, no train split, network down...
        raise UnreadableFileError(f"could not load this dataset from the Hugging Face Hub "
                                  f"({short_error(exc)})", file=repo_id, code="hub") from None
    return Source(loaded, repo_id, "hub", columns=list(loaded.column_names))
