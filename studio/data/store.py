"""Import a dataset into a project: read, detect, validate, normalise, split, save, record.

An import is atomic. Everything is written into a hidden temporary sibling folder
(``datasets/.tmp-<random>/``) that is renamed into place only when complete; on any failure it
is removed and no database row is added, so a broken file never leaves a half-imported dataset.
The row is added after the rename, and if that fails the folder is removed again.

Layout of an imported dataset::

    projects/<project folder>/datasets/<slug>-<hash8>/
        train/      Dataset.save_to_disk, canonical rows only ({"messages": [...]} or {"text"})
        eval/       the same (possibly empty)
        meta.json   source, hash, detection, mapping, counts, dropped rows, validation summary

Re-importing the same content with the same options into the same project returns the existing
dataset (``reused=True``) and writes nothing; different options (another mapping, ratio, seed)
make a new import, since the result would differ.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from studio import config, samples
from studio.db import Database, Project
from studio.projects import project_dir

from .detect import Detection, detect
from .errors import UnreadableFileError
from .normalize import resolve
from .readers import ROW, TEXT_MODES, read_source
from .sniff import source_kind
from .validate import HASH, ON_INVALID, ON_LONG, ValidationReport, validate

SPLITS = ("train", "eval")
TMP_PREFIX = ".tmp-"
STALE_TMP_S = 24 * 3600  # leftovers of a killed import; younger ones may be in progress
NAME_MAX = 120


@dataclass
class ImportResult:
    """The dataset row, its folder, and (for a fresh import) what detection and validation
    found. ``reused`` is True when the same content was already imported: nothing was written."""

    dataset: Any  # studio.db.Dataset
    folder: Path
    reused: bool = False
    detection: Detection | None = None
    report: ValidationReport | None = None
    eval_report: ValidationReport | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def datasets_dir(project: Project) -> Path:
    return project_dir(project) / "datasets"


def dataset_dir(db: Database, dataset_id: int) -> Path:
    row = db.get_dataset(dataset_id)
    if row is None or not row.folder:
        raise LookupError(f"no imported dataset with id {dataset_id}")
    project = db.get_project(row.project_id)
    if project is None:
        raise LookupError(f"dataset {dataset_id} has no project")
    return config.child_path(datasets_dir(project), row.folder)


def load_dataset_split(db: Database, dataset_id: int, split: str) -> datasets.Dataset:
    """The canonical ``train`` or ``eval`` split of an imported dataset (memory-mapped)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    path = dataset_dir(db, dataset_id) / split
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    if not state.get("_data_files"):
        # datasets saves an empty split without any data file and then cannot load it back
        # (IndexError in concat_tables), so rebuild the empty split from its saved features.
        info = datasets.DatasetInfo.from_directory(str(path))
        return datasets.Dataset.from_dict({name: [] for name in info.features},
                                          features=info.features)
    return datasets.load_from_disk(str(path))


def import_sample_task(db: Database, project: Project | int, task_name: str,
                       **options: Any) -> ImportResult:
    """Import a sample task with its committed train and eval files (400 / 50 rows)."""
    task = samples.get_task(task_name)
    return import_dataset(db, project, task.train_path, name=task.title, format="alpaca",
                          eval_source=task.eval_path, **options)


def import_dataset(db: Database, project: Project | int, source: str | os.PathLike, *,
                   name: str | None = None, format: str | None = None,
                   mapping: dict[str, str] | None = None, text_mode: str = "line",
                   on_invalid: str = "drop", eval_ratio: float = 0.1,
                   eval_source: str | os.PathLike | None = None, seed: int = 0,
                   max_tokens: int | None = None,
                   token_counter: Callable[[list[str]], list[int]] | None = None,
                   on_long: str = "keep") -> ImportResult:
    """Import ``source`` into ``project``; see the module docstring. Bad input raises only
    ``DataError`` subclasses; bad arguments raise ValueError."""
    project = _project(db, project)
    _check_args(eval_ratio, text_mode, on_invalid, on_long, max_tokens)
    options = _jsonable({"format": format, "mapping": mapping, "text_mode": text_mode,
                         "on_invalid": on_invalid, "eval_ratio": eval_ratio, "seed": seed,
                         "max_tokens": max_tokens, "on_long": on_long,
                         "tokenizer": token_counter is not None})
    ids = [content_hash(source)]
    if eval_source is not None:
        ids.append(content_hash(eval_source))
    digest = None if None in ids else _combine(ids)
    if digest:
        found = _existing(db, project, digest, options)
        if found is not None:
            return found
    root = datasets_dir(project)
    root.mkdir(parents=True, exist_ok=True)
    _sweep_stale(root)
    tmp = root / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        built = _build(tmp, source, eval_source, format, mapping, text_mode, on_invalid,
                       eval_ratio, seed, max_tokens, token_counter, on_long)
        hub_ids = built.pop("hub_ids")
        if not digest:  # a hub dataset: its content is known only once loaded
            digest = _combine([known or hub for known, hub in zip(ids, hub_ids)])
            found = _existing(db, project, digest, options)
            if found is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                return found
        detection, report, eval_report = built.pop("objects")
        title = _clean_name(name) or built["default_name"]
        meta = {"name": title, "source_path": built["source"], "source_hash": digest,
                "options": options, **{k: v for k, v in built.items()
                                       if k not in ("default_name", "source")}}
        (tmp / "meta.json").write_text(json.dumps(_jsonable(meta), indent=2), encoding="utf-8")
        final = _free_folder(root, title, digest)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        row = db.add_dataset(
            project.id, name=title, folder=final.name, source_path=built["source"],
            source_hash=digest, format=meta["format"], mapping=meta["mapping"],
            num_rows=meta["rows"]["train"] + meta["rows"]["eval"],
            num_train=meta["rows"]["train"], num_eval=meta["rows"]["eval"],
            stats=_stats(meta))
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        raise
    return ImportResult(row, final, False, detection, report, eval_report, meta)


def _build(tmp: Path, source, eval_source, fmt, mapping, text_mode, on_invalid, eval_ratio,
           seed, max_tokens, token_counter, on_long) -> dict[str, Any]:
    """Everything up to meta.json, written under ``tmp``; returns what meta.json records."""
    work = tmp / "work"
    check = dict(on_invalid=on_invalid, max_tokens=max_tokens, token_counter=token_counter,
                 on_long=on_long)
    src = read_source(source, work / "train", text_mode=text_mode)
    detection = detect(src.columns, src.head(200), source_kind=src.kind)
    fmt, mapping_used = resolve(detection, fmt, mapping, src.file)
    report, canonical = validate(src, fmt, mapping_used, work / "train", **check)
    eval_report, esrc = None, None
    if eval_source is not None:
        esrc = read_source(eval_source, work / "eval", text_mode=text_mode)
        edet = detect(esrc.columns, esrc.head(200), source_kind=esrc.kind)
        _, emapping = resolve(edet, fmt, mapping, esrc.file)
        eval_report, eval_ds = validate(esrc, fmt, emapping, work / "eval", **check)
        train_ds = canonical
    else:
        train_ds, eval_ds = _split(canonical, eval_ratio, seed)
    for split, ds in (("train", train_ds), ("eval", eval_ds)):
        ds.remove_columns([ROW, HASH]).save_to_disk(str(tmp / split))
    counts = {"total": report.total_rows, "usable": report.ok_count, "train": len(train_ds),
              "eval": len(eval_ds)}
    hub_ids = [_hub_id(src)] + ([_hub_id(esrc)] if eval_source is not None else [])
    default_name = src.file if src.kind == "hub" else Path(src.file).stem or src.file
    built = {
        "file": src.file, "file_kind": src.kind, "file_note": src.note, "kind": report.kind,
        "canonical": "messages" if report.kind == "chat" else "text",
        "format": fmt, "mapping": mapping_used, "detected_format": detection.format,
        "confidence": detection.confidence, "evidence": detection.evidence,
        "candidates": [vars(c) for c in detection.candidates], "text_mode": text_mode,
        "rows": counts,
        "split": {"eval_ratio": None if eval_source is not None else eval_ratio, "seed": seed,
                  "eval_source": None if eval_source is None else _source_text(eval_source)},
        "validation": report.to_dict(),
        "eval_validation": eval_report.to_dict() if eval_report else None,
        "source": _source_text(source), "default_name": default_name,
        "hub_ids": hub_ids, "objects": (detection, report, eval_report),
    }
    # Let go of the memory-mapped work files before deleting them (Windows refuses otherwise).
    del src, esrc, canonical, train_ds, eval_ds
    gc.collect()
    shutil.rmtree(work, ignore_errors=True)
    return built


def _split(ds: datasets.Dataset, ratio: float, seed: int
           ) -> tuple[datasets.Dataset, datasets.Dataset]:
    """A seeded random eval share; both splits keep file order (the trainer shuffles). Train
    always keeps at least one row, and eval gets at least one when asked for and possible."""
    n = len(ds)
    n_eval = 0 if ratio <= 0 or n < 2 else min(n - 1, max(1, round(n * ratio)))
    order = np.random.default_rng(seed).permutation(n)
    return ds.select(np.sort(order[n_eval:])), ds.select(np.sort(order[:n_eval]))


def content_hash(source: str | os.PathLike) -> str | None:
    """sha256 of a file's bytes, or of a folder's file names and bytes (streamed); None for a
    hub id, whose content is only known once loaded."""
    where, path = source_kind(source)
    if where == "hub":
        return None
    assert path is not None
    digest = hashlib.sha256()
    files = [path] if where == "file" else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if where == "folder":
            digest.update(file.relative_to(path).as_posix().encode("utf-8") + b"\0")
        try:
            with file.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
        except OSError as exc:
            raise UnreadableFileError(f"cannot read the file ({exc.strerror or exc})",
                                      file=file.name, code="unreadable") from None
    return digest.hexdigest()


def _existing(db: Database, project: Project, digest: str, options: dict
              ) -> ImportResult | None:
    for row in reversed(db.list_datasets(project.id)):
        if row.source_hash != digest or (row.stats or {}).get("options") != options:
            continue
        try:
            folder = config.child_path(datasets_dir(project), row.folder or "")
        except ValueError:
            continue
        if (folder / "meta.json").is_file():
            meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
            return ImportResult(row, folder, reused=True, meta=meta)
    return None


def _stats(meta: dict) -> dict[str, Any]:
    """The database copy of meta.json's headline numbers (the Data tab's list view)."""
    val = meta["validation"]
    return {"kind": meta["kind"], "file_kind": meta["file_kind"],
            "detected_format": meta["detected_format"], "confidence": meta["confidence"],
            "evidence": meta["evidence"], "total_rows": val["total_rows"],
            "invalid_rows": val["invalid_rows"], "dropped_long": val["dropped_long"],
            "duplicates": val["duplicates"], "errors_by_code": val["errors_by_code"],
            "warnings": [w["message"] for w in val["warnings"]], "summary": val["summary"],
            "options": meta["options"]}


def _check_args(eval_ratio: float, text_mode: str, on_invalid: str, on_long: str,
                max_tokens: int | None) -> None:
    """Programming errors fail before a big file is read, not after."""
    if not 0 <= eval_ratio < 1:
        raise ValueError(f"eval_ratio must be at least 0 and below 1, not {eval_ratio!r}")
    for value, allowed, what in ((text_mode, TEXT_MODES, "text_mode"),
                                 (on_invalid, ON_INVALID, "on_invalid"),
                                 (on_long, ON_LONG, "on_long")):
        if value not in allowed:
            raise ValueError(f"{what} must be one of {allowed}, not {value!r}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, not {max_tokens!r}")


def _project(db: Database, project: Project | int) -> Project:
    if isinstance(project, Project):
        return project
    found = db.get_project(int(project))
    if found is None:
        raise ValueError(f"no project with id {project}")
    return found


def _clean_name(name: str | None) -> str:
    return " ".join((name or "").split())[:NAME_MAX]


def _free_folder(root: Path, title: str, digest: str) -> Path:
    base = f"{config.slugify(title, max_len=40)}-{digest[:8]}"
    folder, n = base, 1
    while (root / folder).exists():
        n += 1
        folder = f"{base}-{n}"
    return config.child_path(root, folder)


def _sweep_stale(root: Path) -> None:
    now = time.time()
    for leftover in root.glob(f"{TMP_PREFIX}*"):
        try:
            if now - leftover.stat().st_mtime > STALE_TMP_S:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass


def _source_text(source: str | os.PathLike) -> str:
    where, path = source_kind(source)
    return str(path.resolve()) if path is not None else str(source)


def _hub_id(src) -> str | None:
    """A hub dataset's identity: its id and the fingerprint ``datasets`` gives its files."""
    return f"hub:{src.file}:{src.dataset._fingerprint}" if src.kind == "hub" else None


def _combine(ids: list[str]) -> str:
    return ids[0] if len(ids) == 1 else _sha("+eval:".join(ids))


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _jsonable(value: Any) -> Any:
    """A JSON round trip, so stored options compare equal to fresh ones."""
    return json.loads(json.dumps(value, default=str))


__all__ = ["ImportResult", "content_hash", "dataset_dir", "datasets_dir",
           "import_dataset", "import_sample_task", "load_dataset_split"]
