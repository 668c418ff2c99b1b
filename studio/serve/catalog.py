"""What a server serves: the base model, the adapters by their served names, and the folders
from which ``POST /v1/adapters`` may load more.

A project's catalog is its finished runs' trained adapters, one per run: a completed run's
final adapter, a stopped-and-saved run's latest checkpoint (``studio.export.weights`` decides
which weights a run has, and only inside the run's own folder). Whole-model runs are skipped:
they are models, not adapters over this base. A run's served name is its name, slugified, plus
``-<id>`` (``lora-on-dates-7``): readable, unique in the project, and stable across restarts.

Folders named on the command line (``--adapter NAME=PATH``) are served as given: the user chose
them. Anything a client asks to load at run time must lie inside ``allowed_roots`` (the
project's ``runs/`` and ``exports/``), links resolved. Nothing here imports torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from studio import config
from studio.compare.sources import AdapterSourceError, detect_method
from studio.db import Database, RunStatus

NAME_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,64}")  # the engine's rule for a served name
# The runs whose trained weights are served: a completed run's final adapter, a run stopped and
# saved by the user (its latest checkpoint). A failed or out-of-memory run's checkpoint is left
# out: nobody chose to keep it, and its last steps may have diverged.
SERVED_STATUSES = (RunStatus.COMPLETED.value, RunStatus.CANCELLED.value)


class CatalogError(ValueError):
    """A catalog that cannot be built (no such project, a run that is not servable, a bad
    ``--adapter``), with the reason a user can act on."""


@dataclass
class Catalog:
    base_source: str  # what studio.models loads ("default", a folder, a hub id)
    base_name: str  # the ``model`` a client sends for the base (the embedded model: its hub id)
    adapters: dict[str, Path] = field(default_factory=dict)  # served name -> adapter folder
    allowed_roots: list[Path] = field(default_factory=list)  # where POST /v1/adapters may load from
    notes: list[str] = field(default_factory=list)  # runs skipped, and why (printed at start)

    def may_load(self, folder: Path) -> bool:
        """Whether a client may load ``folder`` (already resolved): inside an allowed root, or a
        folder the command line named."""
        if any(folder == root or folder.is_relative_to(root) for root in self.allowed_roots):
            return True
        return any(folder == _resolved(path) for path in self.adapters.values())


def base_name_for(source: str) -> str:
    """The name clients send for the base: the hub id for the embedded model and hub sources, a
    local folder's or file's name otherwise (``studio.export.card.base_model_reference``)."""
    from studio.export.card import base_model_reference

    return base_model_reference(source)[0]


def parse_adapter_args(values: list[str]) -> dict[str, Path]:
    """``["NAME=PATH", ...]`` -> {name: folder}; each folder checked (``detect_method``: an
    adapter the studio recognises, safetensors weights only). ``CatalogError`` names the bad
    item."""
    out: dict[str, Path] = {}
    for item in values:
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise CatalogError(f"--adapter expects NAME=PATH, got {item!r}")
        if not NAME_PATTERN.fullmatch(name):
            raise CatalogError(f"--adapter {item!r}: the name may hold only letters, digits and "
                               "'.', '_', ':', '-' (at most 64)")
        if name in out:
            raise CatalogError(f"--adapter: the name {name!r} is given twice")
        folder = _resolved(Path(path).expanduser())
        try:
            detect_method(folder)
        except AdapterSourceError as exc:
            raise CatalogError(f"--adapter {name}: {exc}") from None
        out[name] = folder
    return out


def parse_run_ids(runs: str) -> list[int] | None:
    """``"all"`` -> None; ``"3,5,8"`` -> [3, 5, 8]."""
    text = runs.strip().lower()
    if text == "all":
        return None
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CatalogError(f"--runs expects 'all' or run ids separated by commas (3,5,8), got {runs!r}") from None
    if not ids:
        raise CatalogError(f"--runs expects 'all' or run ids separated by commas, got {runs!r}")
    return ids


def find_project(db: Database, project: str | int):
    """A project by name, or by id when no project has that name."""
    found = db.get_project_by_name(str(project)) if isinstance(project, str) else None
    if found is None and str(project).strip().isdigit():
        found = db.get_project(int(str(project).strip()))
    if found is None:
        names = ", ".join(sorted(p.name for p in db.list_projects())[:10]) or "none yet"
        raise CatalogError(f"no project {project!r} (projects: {names})")
    return found


def project_catalog(db: Database, project: str | int, runs: str = "all", model: str | None = None) -> Catalog:
    """The catalog of a project's runs (``runs``: "all" or "3,5,8") over ``model`` (default: the
    project's model). A run named in ``runs`` that cannot be served is an error; with "all",
    such runs are skipped and noted. A run trained on another base model is not served: its
    adapter's shapes may not even fit, and where they do its answers would be meaningless."""
    from studio.export import exports_dir
    from studio.runs.launch import runs_root

    found = find_project(db, project)
    wanted = parse_run_ids(runs)
    by_id = {run.id: run for run in db.list_runs(found.id)}
    if wanted is not None:
        missing = [run_id for run_id in wanted if run_id not in by_id]
        if missing:
            raise CatalogError(f"project {found.name!r} has no run {', '.join(map(str, missing))} "
                               f"(its runs: {', '.join(map(str, sorted(by_id))) or 'none'})")
    source = model or found.model_source
    catalog = Catalog(source, base_name_for(source),
                      allowed_roots=[_resolved(runs_root(db, found.id)),
                                     _resolved(exports_dir(db, found.id))])
    for run in sorted(by_id.values(), key=lambda r: r.id):
        if wanted is not None and run.id not in wanted:
            continue
        folder, why = _run_adapter(db, run, source)
        if folder is None:
            if wanted is not None:
                raise CatalogError(f"run {run.id} ({run.name!r}) cannot be served: {why}")
            catalog.notes.append(f"run {run.id} ({run.name!r}) skipped: {why}")
            continue
        catalog.adapters[served_name(run.name, run.id)] = folder
    return catalog


def served_name(run_name: str, run_id: int) -> str:
    """``lora-on-dates-7``: the slug keeps it readable, the id makes it unique."""
    suffix = f"-{run_id}"
    return config.slugify(run_name, max_len=64 - len(suffix)) + suffix


def _run_adapter(db: Database, run, base_source: str) -> tuple[Path | None, str]:
    """(the adapter folder a run serves, "") or (None, why not)."""
    from studio.export.weights import exportable
    from studio.methods import SettingError, get_method

    trained_on = str((run.spec or {}).get("model", base_source))
    if not same_source(trained_on, base_source):
        return None, f"it was trained on {trained_on}, not on the served base {base_source}"

    try:
        if get_method(run.method).whole_model:
            return None, f"{run.method} trains the whole model, not an adapter over the base"
    except SettingError:
        pass  # a method this version does not know: its folder decides below
    if run.status not in SERVED_STATUSES:
        return None, f"it is {run.status} (served: completed runs, and runs stopped and saved)"
    weights = exportable(db, run)  # final weights first, then checkpoints newest first
    if not weights:
        return None, "no trained adapter on disk"
    folder = _resolved(weights[0].path)
    try:
        detect_method(folder)
    except AdapterSourceError as exc:
        return None, str(exc)
    return folder, ""


def same_source(a: str, b: str) -> bool:
    """Two model sources that name the same model: equal as written, or the same folder."""
    if a == b:
        return True
    left, right = Path(a).expanduser(), Path(b).expanduser()
    return left.exists() and right.exists() and _resolved(left) == _resolved(right)


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a link loop: compared as written, never inside a root
        return path.absolute()
