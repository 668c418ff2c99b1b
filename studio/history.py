"""The history of a project, without any UI: run summaries (the runs table), filtering and
sorting, configuration diffs between runs, renaming, notes, deleting a run with its files, and
cloning a run's RunSpec for a new run.

The History tab (``studio/ui/history_tab.py``) only turns these into widgets, so everything here
is tested against a real database and real folders. Numbers come from what the worker recorded
(``loss``, ``eval_loss``, ``eval_exact_match``, ``peak_memory_bytes``; see
``worker/trainer.py``), never from anything the UI kept, so they are the same after a restart.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from studio import config
from studio.adapters import derived
from studio.db import NAME_MAX, Database, Run, RunStatus, utcnow
from studio.db.summary import MetricSummary, metric_summaries
from studio.runspec import RunSpec
from studio.runs import launch, outcome
from studio.ui.labels_compose import DERIVED  # plain strings: no UI is imported

NOTE_MAX = 10_000
MISSING = "(not set)"  # a field one runspec has and another lacks, as the diff shows it


class HistoryError(ValueError):
    """An action on the history that was refused, with the reason a user can act on."""


@dataclass
class RunSummary:
    """One row of the runs table: raw values (for sorting); the UI formats them."""

    id: int
    name: str
    status: str
    method: str
    settings: str  # the key hyperparameters, short
    steps: int | None
    train_loss: float | None
    eval_loss: float | None
    eval_score: float | None  # exact match on a sample task's eval split
    duration_s: float | None
    peak_memory_bytes: float | None
    created_at: datetime
    notes: str
    stopped: str | None = None  # a cancelled run: how (runs.outcome.stop_kind: saved, discarded, ...)
    derived: str | None = None  # a combined adapter (studio.adapters.derived): its recipe, short


SORT_FIELDS = tuple(f.name for f in dataclasses.fields(RunSummary))


# ---- the runs table ----
def _number(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def key_settings(spec: dict[str, Any]) -> str:
    """The few hyperparameters that tell runs apart at a glance: the method's first two numbers
    (rank and alpha for LoRA, virtual tokens for prompts...), any other method setting changed
    from its default, then learning rate, batch and max steps."""
    from studio.methods import get_method

    parts: list[str] = []
    settings = spec.get("method_settings") or {}
    try:
        method_fields = get_method(spec.get("method", "")).fields()
    except ValueError:  # a method this version does not know: show its settings as given
        method_fields = []
        parts = [f"{k} {_number(v)}" for k, v in settings.items()]
    numbers = 0
    for f in method_fields:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        value = settings.get(f.name, default)
        is_number = isinstance(default, (int, float)) and not isinstance(default, bool)
        if is_number and not f.metadata.get("advanced") and numbers < 2:
            numbers += 1
            parts.append(f"{f.name} {_number(value)}")
        elif value != default and not (isinstance(default, tuple) and list(default) == value):
            parts.append(f"{f.name} {_number(value) if not isinstance(value, list) else ','.join(map(str, value))}")
    if "learning_rate" in spec:
        parts.append(f"lr {_number(spec['learning_rate'])}")
    if "batch_size" in spec:
        accum = spec.get("grad_accum", 1)
        parts.append(f"batch {spec['batch_size']}" + (f"×{accum}" if accum != 1 else ""))
    return " · ".join(parts)


def _last(metrics: MetricSummary, name: str) -> float | None:
    point = metrics.last.get(name)
    return point[1] if point is not None else None


# High-water marks: the training callback's, and the bake-off's (measured on the same device
# after training, on the saved adapter). The largest is the run's peak.
PEAK_METRICS = ("peak_memory_bytes", "peak_cuda_allocated_bytes", "peak_rss_bytes")


def _peak_memory(metrics: MetricSummary) -> float | None:
    """The recorded high-water mark; runs from before it was recorded fall back to the largest
    sampled use (a lower bound of the peak)."""
    for names in (PEAK_METRICS, ("memory_bytes",)):
        values = [v for v in (metrics.peak.get(n) for n in names) if v is not None and math.isfinite(v)]
        if values:
            return max(values)
    return None


def duration_s(run: Run, now: datetime | None = None) -> float | None:
    """Wall time of the run's last start to its end (to now while it runs); a resumed run
    counts from its resume, as the Train tab's summary does."""
    if run.started_at is None:
        return None
    end = run.finished_at or (now or utcnow() if run.status == RunStatus.RUNNING.value else None)
    return None if end is None else max(0.0, (end - run.started_at).total_seconds())


def summarize(db: Database, runs: Sequence[Run]) -> list[RunSummary]:
    metrics = metric_summaries(db, [r.id for r in runs])
    now = utcnow()
    rows = []
    for run in runs:
        m = metrics[run.id]
        step = m.last.get("loss", (None, None))[0]
        recipe = derived.recipe_of(run)
        # A combined run's spec is its first parent's: its settings are the recipe, not that spec's.
        settings = key_settings(run.spec or {}) if recipe is None else derived.text(recipe)
        rows.append(RunSummary(
            id=run.id, name=run.name, status=run.status, method=run.method, settings=settings,
            steps=max((s for s, _ in m.last.values()), default=step), train_loss=_last(m, "loss"),
            eval_loss=_last(m, "eval_loss"), eval_score=_last(m, "eval_exact_match"),
            duration_s=duration_s(run, now), peak_memory_bytes=_peak_memory(m), created_at=run.created_at,
            notes=run.notes or "", stopped=outcome.stop_kind(run),
            derived=derived.short(recipe) if recipe is not None else None))
    return rows


def run_summaries(db: Database, project_id: int | None) -> list[RunSummary]:
    """Every run of the project, newest first."""
    return summarize(db, db.list_runs(project_id)) if project_id is not None else []


def filter_runs(rows: Iterable[RunSummary], text: str = "", statuses: Iterable[str] = (),
                methods: Iterable[str] = ()) -> list[RunSummary]:
    """Rows whose name, notes, method (a combined run's: "combined") or settings contain ``text``
    (any case, or ``#id``), with
    one of ``statuses`` and one of ``methods`` (empty: any)."""
    needle, statuses, methods = (text or "").strip().lower(), set(statuses or ()), set(methods or ())
    out = []
    for row in rows:
        marker = f" {DERIVED['marker']}" if row.derived else ""  # "combined" finds the combined runs
        haystack = f"#{row.id} {row.name} {row.notes} {row.method}{marker} {row.settings}".lower()
        if ((not needle or needle in haystack) and (not statuses or row.status in statuses)
                and (not methods or row.method in methods)):
            out.append(row)
    return out


def sort_runs(rows: Iterable[RunSummary], field: str = "created_at", descending: bool = True) -> list[RunSummary]:
    """Sorted by one RunSummary field; rows without a value (no eval, NaN loss) go last either way."""
    if field not in SORT_FIELDS:
        raise HistoryError(f"cannot sort by {field!r}; choose one of {SORT_FIELDS}")

    def empty(row: RunSummary) -> bool:
        value = getattr(row, field)
        return value is None or (isinstance(value, float) and math.isnan(value))

    present = [r for r in rows if not empty(r)]
    missing = [r for r in rows if empty(r)]
    key = (lambda r: getattr(r, field).lower()) if field in ("name", "status", "method", "settings", "notes") \
        else (lambda r: getattr(r, field))
    return sorted(present, key=lambda r: (key(r), r.id), reverse=descending) + missing


# ---- configuration diff ----
def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level with dotted keys (``method_settings.r``); lists stay values."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, inner in value.items():
        out.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
    return out


def effective_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The runspec as the worker ran it: every RunSpec field and every method setting, defaults
    filled in. Two runs that differ only in whether a default was spelled out are the same run,
    and must not show a difference."""
    try:
        full = RunSpec.from_dict(dict(spec)).to_dict()
        from studio.methods import get_method

        params = get_method(full["method"]).params(full["method_settings"])
        settings = dataclasses.asdict(params)
        full["method_settings"] = {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}
        return full
    except (ValueError, TypeError):  # a runspec this version cannot read: compare it as stored
        return dict(spec)


def config_diff(specs: Sequence[dict[str, Any]]) -> list[tuple[str, list[Any]]]:
    """``[(dotted field, [value per spec])]`` for exactly the fields whose values are not all
    equal, in the order the fields first appear; a field a spec lacks shows as ``MISSING``."""
    flats = [flatten(s) for s in specs]
    keys = list(dict.fromkeys(k for flat in flats for k in flat))
    rows = []
    for key in keys:
        values = [flat.get(key, MISSING) for flat in flats]
        present = [key in flat for flat in flats]
        if not all(present) or any(_differs(v, values[0]) for v in values[1:]):
            rows.append((key, values))
    return rows


def _differs(a: Any, b: Any) -> bool:
    # bool is an int in Python (True == 1): a switch and a count must not compare equal.
    return type(a) is bool and type(b) is not bool or type(b) is bool and type(a) is not bool or a != b


def run_config_diff(db: Database, run_ids: Sequence[int]) -> list[tuple[str, list[Any]]]:
    return config_diff([effective_spec(_require(db, i).spec or {}) for i in run_ids])


# ---- editing ----
def _require(db: Database, run_id: int | None) -> Run:
    run = db.get_run(run_id) if run_id is not None else None
    if run is None:
        raise HistoryError(f"no run with id {run_id}")
    return run


def rename_run(db: Database, run_id: int, name: str) -> Run:
    """A new display name; the folder keeps its name, so recorded paths stay valid."""
    _require(db, run_id)
    name = (name or "").strip()
    if not name:
        raise HistoryError("a run needs a name")
    if len(name) > NAME_MAX:
        raise HistoryError(f"run names are at most {NAME_MAX} characters")
    return db.update_run(run_id, name=name)


def set_note(db: Database, run_id: int, note: str) -> Run:
    _require(db, run_id)
    note = (note or "").strip()
    if len(note) > NOTE_MAX:
        raise HistoryError(f"notes are at most {NOTE_MAX:,} characters")
    return db.update_run(run_id, notes=note)


# ---- deleting ----
def run_files(db: Database, run: Run) -> Path | None:
    """The run's folder, only if it is a real folder directly inside its project's runs folder.

    ``run.folder`` comes from the database, which a user (or a bug) can change: a name with
    separators or '..' is refused by ``config.child_path``, and so is a folder that is a link
    (resolving it would land elsewhere); ``delete_run`` then removes only the link itself."""
    if not run.folder:
        return None
    root = launch.runs_root(db, run.project_id)
    return config.child_path(root, run.folder)


def delete_run(db: Database, run_id: int) -> list[str]:
    """Delete a finished (or never started) run: its row, metrics and checkpoints (the database
    cascades), and its folder. Exports made from it are kept (their row forgets the run).
    Returns what was removed from disk. Nothing outside the run's folder is touched; a running
    run is refused (stop it first)."""
    launch.reconcile(db)  # a worker that died is not "running" any more
    run = _require(db, run_id)
    if run.status == RunStatus.RUNNING.value:
        raise HistoryError(f"run #{run.id} is training; stop it before deleting it")
    removed: list[str] = []
    trash: Path | None = None
    if run.folder:
        root = launch.runs_root(db, run.project_id)
        link = root / run.folder
        if "/" in run.folder or "\\" in run.folder or run.folder in (".", ".."):
            raise HistoryError(f"run #{run.id}'s folder {run.folder!r} is not inside its runs folder; "
                               "nothing was deleted")
        if link.is_symlink():  # never follow it: remove the link, not what it points to
            link.unlink()
            removed.append(str(link))
        else:
            try:
                folder = run_files(db, run)
            except ValueError as exc:
                raise HistoryError(f"run #{run.id}'s folder is not inside its runs folder ({exc}); "
                                   "nothing was deleted") from None
            if folder is not None and folder.exists():
                # Rename first (atomic, same folder): a crash between here and the row deletion
                # leaves a hidden folder, never a run row whose files are half gone.
                trash = folder.with_name(f".deleting-{folder.name}-{uuid.uuid4().hex[:8]}")
                folder.rename(trash)
                removed.append(str(folder))
    try:
        db.delete_run(run.id)
    except Exception:
        if trash is not None:
            trash.rename(trash.parent / run.folder)
        raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return removed


# ---- cloning ----
def clone_spec(db: Database, run_id: int) -> RunSpec:
    """The run's RunSpec, as the starting point of a new run. A combined adapter is refused: its
    spec is its first parent's, and training that would not make another run like it."""
    run = _require(db, run_id)
    recipe = derived.recipe_of(run)
    if recipe is not None:
        raise HistoryError(DERIVED["no_clone"].format(
            id=run.id, recipe=derived.text(recipe), parents=", ".join(f"#{i}" for i, _ in recipe.parents)))
    return RunSpec.from_dict(dict(run.spec or {}))


def hidden_changes(spec: RunSpec, shown: Iterable[str]) -> dict[str, Any]:
    """Fields of ``spec`` that differ from the defaults but that no widget in ``shown`` sets: a
    clone keeps them in the run draft, where the user cannot see them, so the user is told."""
    default, skip = RunSpec(), set(shown) | {"model", "method", "method_settings", "dataset_id", "sample_task"}
    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(RunSpec)
            if f.name not in skip and getattr(spec, f.name) != getattr(default, f.name)}
