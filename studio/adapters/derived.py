"""A derived run (adapters composed by ``studio.adapters.compose``) as the rest of the app reads it:
whether a run is one, its recipe, the short form lists show ("ties of #3 + #5") and the full
recipe with its parents' names ("#5 (deleted)" for a parent removed since).

History (the runs table, the run panel, Clone), the Train tab's Resume and Compare's adapter
labels all read derived runs through here, so they agree on what is shown; nothing here writes
or loads anything (no torch: the UI imports it).
"""

from __future__ import annotations

from typing import Any

from studio.adapters.compose import CompositionError, Recipe

DELETED = "(deleted)"


def recipe_of(run: Any) -> Recipe | None:
    """The run's recipe, or None for a trained run. A recipe this version cannot read is still a
    derived run (it must not be offered for resume or clone): what can be read of it is kept."""
    data = getattr(run, "recipe", None)
    if not data:
        return None
    try:
        return Recipe.from_dict(data)
    except (CompositionError, ValueError, TypeError, KeyError, AttributeError):
        if not isinstance(data, dict):
            return Recipe("?", ())
        return Recipe(str(data.get("combination", "?")), tuple(_readable_parents(data.get("parents"))))


def _readable_parents(parents: Any) -> list[tuple[int, float]]:
    """The (run id, weight) pairs of a damaged recipe that still read as such."""
    found = []
    for item in parents if isinstance(parents, list) else []:
        if isinstance(item, dict) and isinstance(item.get("run_id"), int):
            weight = item.get("weight")
            found.append((item["run_id"], float(weight) if isinstance(weight, (int, float)) else float("nan")))
    return found


def is_derived(run: Any) -> bool:
    return bool(getattr(run, "recipe", None))


def short(recipe: Recipe) -> str:
    """The recipe in a few words, for lists and labels: "ties of #3 + #5"."""
    return f"{recipe.combination} of " + " + ".join(f"#{run_id}" for run_id, _ in recipe.parents)


def parent_names(db: Any, recipe: Recipe) -> dict[int, str]:
    """Each parent's current name; ``DELETED`` for a parent run removed since the composition."""
    names = {}
    for run_id, _ in recipe.parents:
        parent = db.get_run(run_id)
        names[run_id] = parent.name if parent is not None else DELETED
    return names


def text(recipe: Recipe, names: dict[int, str] | None = None) -> str:
    """``Recipe.describe``; the short form for a recipe this version cannot describe (it still
    says what it combined)."""
    try:
        return recipe.describe(names)
    except (CompositionError, ValueError, KeyError, NotImplementedError):
        return short(recipe)


def describe(db: Any, run: Any) -> str | None:
    """The full recipe with the parents' names ("TIES (density 0.5) of #3 dates-lora × 0.6 +
    #5 (deleted) × 0.4"), or None for a trained run."""
    recipe = recipe_of(run)
    return None if recipe is None else text(recipe, parent_names(db, recipe))
