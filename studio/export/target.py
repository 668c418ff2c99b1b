"""Where an export goes, and the one kind of existing folder an export may replace.

"Overwrite" must never mean "delete whatever is there": a user who types their home folder,
``/`` or a project folder as the destination must lose nothing. So every folder an export
writes carries a marker, ``.peft-studio-export.json``, naming the export row that wrote it, a
random token stored in that row too, and the files it wrote. An existing destination is:

- absent or empty: used as is (nothing to lose);
- an earlier export of this studio (its marker matches a recorded export at this very path, and
  the folder holds nothing the export did not write): replaced, only when the caller confirms;
- anything else (no marker, a marker of another history, a copied or moved export, an export
  the user added files to, a file, the root of the file system): refused with an ``ExportError``
  naming the folder and why. Nothing in it is touched.

The replacement itself is two renames in the same parent folder (old aside, new in, then the
old one deleted), so at every moment the path holds either the complete old export or the
complete new one.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import uuid
from pathlib import Path
from typing import Any

MARKER = ".peft-studio-export.json"
MARKER_MAX_BYTES = 1_000_000  # ours are a few KB; a bigger "marker" is not ours
SHOWN = 3  # file names quoted in a refusal


class ExportError(Exception):
    """An export that cannot be made, with the reason a user can act on."""


def new_token() -> str:
    return secrets.token_hex(16)


def resolve_dest(dest: str) -> Path:
    """The folder the user typed, absolute, links followed (the check looks at the real folder)."""
    try:
        target = Path(dest.strip()).expanduser().resolve()
    except (ValueError, OSError, RuntimeError) as exc:  # a NUL byte, a link loop
        raise ExportError(f"{dest!r} is not a usable folder path ({exc})") from None
    if target.parent == target:
        raise ExportError(f"{target} is the root of the file system; choose a new folder for the export")
    return target


def check_destination(db: Any, target: Path, overwrite: bool, project_id: int | None = None) -> bool:
    """Raises ``ExportError`` unless ``target`` may receive the export; returns True when an
    earlier export of ours is there (to be replaced), False when there is nothing to lose.
    ``project_id``: the exporting project, to recognise its exports from before markers."""
    if not target.exists():
        if target.is_symlink():
            raise ExportError(f"{target} is a broken link; choose a new folder for the export")
        return False
    if not target.is_dir():
        raise ExportError(f"{target} is a file, not a folder; choose a new folder for the export")
    try:
        names = sorted(os.listdir(target))
    except OSError as exc:
        raise ExportError(f"{target} cannot be read ({exc.strerror}); choose another folder") from None
    if not names:
        return False
    export_id = _ours(db, target, names, project_id)
    if not overwrite:
        raise ExportError(f"{target} already exists (export #{export_id} of this studio); "
                          "confirm overwrite to replace it")
    return True


def _ours(db: Any, target: Path, names: list[str], project_id: int | None = None) -> int:
    """The id of the export that wrote ``target``; ``ExportError`` saying why it is not ours."""
    refuse = (f"{target} already holds files PEFT Studio did not write, so it is never replaced "
              "(choose a new or empty folder; PEFT Studio only replaces a folder it exported itself): ")
    marker = target / MARKER
    shown = ", ".join(names[:SHOWN]) + (", ..." if len(names) > SHOWN else "")
    if marker.is_symlink() or not marker.is_file():
        legacy = next((e for e in db.list_exports(project_id) if Path(e.path) == target), None) \
            if project_id is not None else None
        if legacy is not None:  # recorded, but from before exports were marked: its files are unknown
            raise ExportError(refuse + f"it has no {MARKER} marker; it looks like export #{legacy.id}, made "
                                       "by an earlier PEFT Studio before exports were marked, but what else "
                                       "was put there since cannot be told. Remove it yourself if you no "
                                       "longer need it, or choose another folder")
        raise ExportError(refuse + f"it has no {MARKER} marker (it holds {shown})")
    try:
        if marker.stat().st_size > MARKER_MAX_BYTES:
            raise ValueError("too large")
        data = json.loads(marker.read_text(encoding="utf-8"))
        export_id, marked_project, token = int(data["export_id"]), int(data["project_id"]), str(data["token"])
        written = set(data["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ExportError(refuse + f"its {MARKER} cannot be read ({exc})") from None
    row = next((e for e in db.list_exports(marked_project) if e.id == export_id), None)
    if row is None:
        raise ExportError(refuse + f"its marker names export #{export_id}, which this studio's "
                                   f"history ({db.path}) does not hold")
    if Path(row.path) != target:
        raise ExportError(refuse + f"it is a copy of export #{export_id}, which was written to {row.path}")
    if (row.verification or {}).get("folder_token") != token:
        raise ExportError(refuse + f"its marker does not match export #{export_id} in the history")
    extra = sorted(set(_files(target)) - written - {MARKER})
    if extra:
        more = ", ..." if len(extra) > SHOWN else ""
        raise ExportError(refuse + f"export #{export_id} is there, but so are files it did not write "
                                   f"({', '.join(extra[:SHOWN])}{more})")
    return export_id


def _files(folder: Path) -> list[str]:
    """Every entry below ``folder`` that is not a plain folder, as relative POSIX paths (links
    are listed, never followed)."""
    out = []
    for root, dirs, files in os.walk(folder):  # os.walk does not follow links to folders
        rel = Path(root).relative_to(folder)
        out += [(rel / name).as_posix() for name in files]
        out += [(rel / name).as_posix() for name in dirs if (Path(root) / name).is_symlink()]
    return out


def write_marker(folder: Path, *, export_id: int, project_id: int, run_id: int, kind: str,
                 dtype: str, token: str) -> None:
    """The marker, written last into the finished (not yet renamed) export folder. No local
    paths in it: export folders get shared."""
    data = {"written_by": "PEFT Studio", "export_id": export_id, "project_id": project_id,
            "run_id": run_id, "kind": kind, "dtype": dtype, "token": token,
            "files": sorted(_files(folder))}
    (folder / MARKER).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def swap_in(db: Any, tmp: Path, target: Path, replacing: bool) -> None:
    """Put the finished ``tmp`` at ``target``. An earlier export is checked again (files may
    have been added since the start) and renamed aside, never deleted before the new one is in
    place; an empty folder is removed with ``rmdir``, which refuses a folder that is not empty."""
    if not replacing:
        if target.is_dir():
            target.rmdir()
        os.rename(tmp, target)
        return
    _ours(db, target, sorted(os.listdir(target)))
    old = target.with_name(f".{target.name}.replaced-{uuid.uuid4().hex[:8]}")
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
