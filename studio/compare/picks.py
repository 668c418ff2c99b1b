"""Which project, base model and trained adapters a scripted Compare names: ``peft-studio compare
--project P --adapters 3,lora-on-dates,5@20``. No torch: every check runs before a model loads.

A run is named by its id (``3`` or ``#3``) or its name (exact, else ignoring case; a name two
runs share must be given by id), optionally ``@STEP`` for one of its checkpoints. Its weights
are the ones an export of the run takes (``studio.export.weights.pick``: the final adapter of a
completed run, else its latest checkpoint, or the checkpoint asked for), so Compare, Export and
Serve agree on what "run 3" means. A run trained on another base model than the one compared
over is refused by name: its adapter's shapes may happen to fit, and its answers would then be
meaningless. Whole-model runs (full, last N) are models, not adapters over the base.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.compare.sources import AdapterSourceError, detect_method
from studio.db import Database


class PickError(ValueError):
    """A project, run or adapter a compare cannot use, with what would be accepted."""


@dataclass(frozen=True)
class Pick:
    """One adapter column: a run's trained weights."""

    label: str  # the column's name: "#3 lora-on-dates", "#3 lora-on-dates @ step 20"
    run_id: int
    run_name: str
    step: int | None  # the checkpoint's step; None: the run's final weights
    folder: Path
    method: str


def choose_project(db: Database, name: str | None) -> Any:
    """The project ``--project`` names, as every command chooses it (``cli_projects.resolve_project``:
    a name, or an id; left out or blank: the only project there is)."""
    from studio.cli_projects import ProjectChoiceError, resolve_project

    try:
        return resolve_project(db, (name or "").strip() or None)
    except ProjectChoiceError as exc:
        raise PickError(str(exc)) from None


def split_items(values: list[str]) -> list[str]:
    """``--adapters 3,5 --adapters lora-a`` -> ["3", "5", "lora-a"] (blank items dropped)."""
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def resolve(db: Database, project: Any, items: list[str], base_source: str) -> list[Pick]:
    """Each item as a ``Pick`` over ``base_source``, or ``PickError`` naming the first bad one."""
    runs = db.list_runs(project.id)
    picks: list[Pick] = []
    for item in items:
        text, step = _split_step(item)
        run = _find_run(db, project, runs, text, item)
        pick = _weights_of(db, run, step, base_source, item)
        if any(p.label == pick.label for p in picks):
            raise PickError(f"--adapters names {pick.label!r} twice")
        picks.append(pick)
    return picks


def _split_step(item: str) -> tuple[str, int | None]:
    """"lora-a@20" -> ("lora-a", 20); an "@" not followed by digits is part of the name."""
    head, sep, tail = item.rpartition("@")
    if sep and head.strip() and tail.strip().isdigit():
        return head.strip(), int(tail.strip())
    return item, None


def _find_run(db: Database, project: Any, runs: list[Any], text: str, item: str) -> Any:
    ident = text[1:] if text.startswith("#") else text
    if ident.isdigit():
        by_id = {run.id: run for run in runs}
        if int(ident) in by_id:
            return by_id[int(ident)]
        other = db.get_run(int(ident))
        if other is not None:
            elsewhere = db.get_project(other.project_id)
            raise PickError(f"--adapters {item!r}: run {other.id} belongs to project "
                            f"{elsewhere.name!r}, not {project.name!r} (give --project {elsewhere.name!r})")
    named = [run for run in runs if run.name == text] or [run for run in runs if run.name.lower() == text.lower()]
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        ids = ", ".join(f"#{run.id}" for run in sorted(named, key=lambda r: r.id))
        raise PickError(f"--adapters {item!r}: {len(named)} runs of project {project.name!r} are named "
                        f"{named[0].name!r} ({ids}); name one by its id")
    known = ", ".join(f"#{run.id} {run.name}" for run in sorted(runs, key=lambda r: r.id)[:12]) or "none yet"
    raise PickError(f"--adapters {item!r}: project {project.name!r} has no run with that id or name "
                    f"(its runs: {known})")


def _weights_of(db: Database, run: Any, step: int | None, base_source: str, item: str) -> Pick:
    from studio.export.target import ExportError
    from studio.export.weights import pick
    from studio.methods import SettingError, get_method
    from studio.serve.catalog import same_source

    trained_on = str((run.spec or {}).get("model", ""))
    if not same_source(trained_on, base_source):
        raise PickError(f"--adapters {item!r}: run {run.id} ({run.name!r}) was trained on "
                        f"{trained_on or 'an unrecorded model'}, "
                        f"not on {base_source}, the model compared over; compare runs of one base "
                        "(--model picks another base)")
    try:
        if get_method(run.method).whole_model:
            raise PickError(f"--adapters {item!r}: run {run.id} ({run.name!r}) trained the whole model "
                            f"({run.method}): there is no adapter to attach over the base")
    except SettingError:
        pass  # a method this version does not know: its folder decides (detect_method)
    try:
        weights = pick(db, run, step)
    except ExportError as exc:
        raise PickError(f"--adapters {item!r}: {exc}") from None
    try:
        method = detect_method(weights.path)
    except AdapterSourceError as exc:
        raise PickError(f"--adapters {item!r}: {exc}") from None
    label = f"#{run.id} {run.name}" + (f" @ step {weights.step}" if weights.step is not None else "")
    return Pick(label, run.id, run.name, weights.step, weights.path, run.method or method)
