"""The Export tab's "Combine adapters" section: pick two or more of the project's finished LoRA runs,
a weight for each, PEFT's combination (linear, cat, SVD, TIES, DARE, ...) with its density or SVD
rank, and a name; "Combine" saves the result as a derived run (``studio.adapters.compose``) that
Compare, History, Export and Serve list like any finished run.

The handlers are module functions taking plain values, so tests drive them against a real
database and real adapters; ``build`` only wires them to widgets. What may be combined and every
refusal (mismatched bases, methods or ranks) come from ``compose.check_recipe`` / ``compose``
and are shown as they are; the recipe is previewed as the user edits it, without loading
anything, so most refusals are seen before the button is pressed. The composition itself runs in
a child process (``compose_in_child``, as the Export tab's export does): the UI process never
loads the model.

Weights are one text field ("0.6, 0.4", in the order the runs were chosen), not an editable table:
the preview under it spells out which weight goes to which run, and a text field cannot lose an
edit to a table redraw when the chosen runs change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import gradio as gr

from studio.adapters import compose
from studio.adapters import derived
from studio.adapters.compose_child import compose_in_child
from studio.db import Database
from studio.ui.labels_compose import COMPOSE as TEXT

DEFAULT_COMBINATION = "cat"  # exact (the weighted sum of the updates) and accepts any mix of ranks


@dataclass
class ComposeHandles:
    """What the Export tab chains on: ``done`` (the Combine click's event) and ``made`` (the new
    run's id after a success, else None), so its run list can re-list and pick the new run."""
    done: Any
    made: gr.State


# ---- handlers (plain values in, plain values out) ----
def parent_choices(db: Database, project_id: int | None) -> list[tuple[str, int]]:
    """(label, run id) of each run that can be combined, as ``compose.composable_runs`` lists them."""
    if project_id is None or db.get_project(project_id) is None:
        return []
    choices = []
    for run in compose.composable_runs(db, project_id):
        recipe = derived.recipe_of(run)
        kind = f"{run.method}, {derived.short(recipe)}" if recipe is not None else run.method
        choices.append((f"#{run.id} {run.name} ({kind})", run.id))
    return choices


def default_weights(combination: str | None, n: int) -> str:
    """Equal weights for ``n`` adapters. TIES-type combinations average the values whose signs
    agree, so each weight is 1 (the average itself); the others add the weighted updates, so the
    weights share 1 (an average, not a sum that doubles the update)."""
    if n <= 0:
        return ""
    each = 1.0 if "ties" in (combination or "") else 1.0 / n
    return ", ".join(f"{each:.4g}" for _ in range(n))


def parse_weights(text: str | None, n: int) -> list[float]:
    """One finite number per chosen adapter; ValueError naming the field otherwise."""
    parts = [p.strip() for p in (text or "").replace(";", ",").split(",") if p.strip()]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise ValueError(TEXT["bad_weights"].format(text=text)) from None
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(TEXT["bad_weights"].format(text=text))
    if len(weights) != n:
        raise ValueError(TEXT["weight_count"].format(n=n, k=len(weights)))
    return weights


def refill_weights(combination: str | None, run_ids: Sequence[int] | None, text: str | None) -> str:
    """The weights field after the chosen runs or the combination changed: the user's own weights
    are kept while they still fit the chosen runs; equal weights replace an empty field, a count
    that no longer fits, or a field that still holds the equal weights of some combination."""
    n = len(run_ids or [])
    current = (text or "").strip()
    defaults = {default_weights(c, len(current.split(","))) for c in compose.COMBINATIONS}
    try:
        parse_weights(current, n)
        fits = True
    except ValueError:
        fits = False
    return current if fits and current not in defaults else default_weights(combination, n)


def recipe_from(combination: str | None, run_ids: Sequence[int] | None, weights: str | None,
                density: float | None, svd_rank: Any) -> compose.Recipe:
    """The recipe the widgets describe; ValueError (a ``CompositionError`` or the weights' and
    rank's own) with what to change. Density and rank are passed only where the combination
    takes them (hidden widgets keep their values)."""
    ids = [int(i) for i in run_ids or []]
    if len(ids) < 2:
        raise compose.CompositionError(TEXT["pick"])
    if combination not in compose.COMBINATIONS:
        raise compose.CompositionError(
            f"combination {combination!r} is not one of {', '.join(compose.COMBINATIONS)}")
    rank = None
    # 0 is "not set": Gradio 6.31's number box sends 0 for an empty field once it is shown.
    if combination in compose.SVD and svd_rank not in (None, "", 0):
        try:
            rank = float(svd_rank)
        except (TypeError, ValueError):
            rank = math.nan
        if not rank.is_integer() or rank < 1:
            raise ValueError(TEXT["bad_rank"].format(value=svd_rank))
        rank = int(rank)
    return compose.Recipe(combination=combination,
                          parents=tuple(zip(ids, parse_weights(weights, len(ids)))),
                          density=float(density) if combination in compose.NEEDS_DENSITY and density is not None
                          else None,
                          svd_rank=rank)


def preview(db: Database, project_id: int | None, combination: str | None, run_ids: Sequence[int] | None,
            weights: str | None, density: float | None, svd_rank: Any) -> str:
    """What the section says under its controls as they change: the recipe with the runs' names,
    or why it cannot be combined (``compose.check_recipe``: nothing is loaded)."""
    if project_id is None:
        return TEXT["no_project"]
    if len(run_ids or []) < 2:
        return TEXT["pick"] if parent_choices(db, project_id) else TEXT["none"]
    try:
        recipe = recipe_from(combination, run_ids, weights, density, svd_rank)
        compose.check_recipe(db, project_id, recipe)
    except ValueError as exc:  # CompositionError is one
        return TEXT["problem"].format(reason=exc)
    return TEXT["preview"].format(text=recipe.describe(derived.parent_names(db, recipe)))


def default_name(recipe: compose.Recipe) -> str:
    return TEXT["default_name"].format(combination=recipe.combination,
                                       parents=" + ".join(f"#{i}" for i, _ in recipe.parents))


def combine(db: Database, project_id: int | None, combination: str | None, run_ids: Sequence[int] | None,
            weights: str | None, density: float | None, svd_rank: Any, name: str | None,
            progress: Callable[[float, str], None] | None = None,
            composer: Callable[..., Any] | None = None) -> tuple[str, int | None]:
    """Compose and save; (the message, the new run's id or None when nothing was made). Every
    refusal is a message, never an exception: the UI stays as it was. ``composer``: None is
    ``compose_in_child`` (the model is loaded in a child process, as an export is, never in the
    UI process); ``compose.compose`` does the same work in this process."""
    if project_id is None or db.get_project(project_id) is None:
        return TEXT["no_project"], None
    try:
        recipe = recipe_from(combination, run_ids, weights, density, svd_rank)
        compose.check_recipe(db, project_id, recipe)  # the quick refusals, before a process starts
        if progress is not None:
            progress(0.1, TEXT["working"])
        run = (composer or compose_in_child)(db, project_id, recipe, (name or "").strip() or default_name(recipe))
    except (ValueError, OSError) as exc:  # CompositionError is a ValueError; OSError: the disk
        return TEXT["refused"].format(reason=exc), None
    return TEXT["done"].format(id=run.id, name=run.name, recipe=derived.describe(db, run)), run.id


# ---- the section ----
def build(db: Database, picker: gr.Dropdown, tab: gr.Tab | None = None, load: Any = None) -> ComposeHandles:
    """Render the section (inside the Export tab, below its controls). It re-lists the runs it
    offers when the project changes, on ``load`` (the page's load event source: ``demo``) and
    when ``tab`` is opened, as the Export tab's own run list does."""
    with gr.Accordion(TEXT["section"], open=False, elem_id="compose-box"):
        gr.Markdown(TEXT["intro"])
        with gr.Row():
            parents = gr.Dropdown([], value=[], multiselect=True, label=TEXT["parents"], info=TEXT["parents_help"],
                                  scale=3, elem_id="compose-parents")
            weights = gr.Textbox(label=TEXT["weights"], info=TEXT["weights_help"], scale=2,
                                 elem_id="compose-weights")
        with gr.Row():
            combination = gr.Dropdown(list(compose.COMBINATIONS), value=DEFAULT_COMBINATION,
                                      label=TEXT["combination"], elem_id="compose-combination")
            density = gr.Slider(0.05, 1.0, value=0.5, step=0.05, label=TEXT["density"], info=TEXT["density_help"],
                                visible=DEFAULT_COMBINATION in compose.NEEDS_DENSITY, elem_id="compose-density")
            svd_rank = gr.Number(0, precision=0, minimum=0, label=TEXT["svd_rank"], info=TEXT["svd_help"],
                                 visible=DEFAULT_COMBINATION in compose.SVD, elem_id="compose-svd-rank")
        combination_help = gr.Markdown(compose.COMBINATIONS[DEFAULT_COMBINATION], elem_id="compose-help")
        name = gr.Textbox(label=TEXT["name"], info=TEXT["name_help"], elem_id="compose-name")
        shown = gr.Markdown(elem_id="compose-preview")
        go = gr.Button(TEXT["go"], variant="primary", elem_id="compose-go")
        result = gr.Markdown(elem_id="compose-result")
    made = gr.State(None)
    recipe_inputs = [picker, combination, parents, weights, density, svd_rank]

    def on_preview(project_id, combination_v, run_ids, weights_v, density_v, rank_v):
        return preview(db, project_id, combination_v, run_ids, weights_v, density_v, rank_v)

    def relist(project_id, chosen):
        choices = parent_choices(db, project_id)
        ids = {c[1] for c in choices}
        return gr.update(choices=choices, value=[i for i in chosen or [] if i in ids])

    def on_combination(combination_v, run_ids, weights_v):
        return (gr.update(visible=combination_v in compose.NEEDS_DENSITY),
                gr.update(visible=combination_v in compose.SVD),
                compose.COMBINATIONS.get(combination_v, ""), refill_weights(combination_v, run_ids, weights_v))

    def on_combine(project_id, combination_v, run_ids, weights_v, density_v, rank_v, name_v,
                   progress=gr.Progress()):
        text, run_id = combine(db, project_id, combination_v, run_ids, weights_v, density_v, rank_v, name_v,
                               progress=lambda f, m: progress(f, desc=m))
        return text, run_id

    quiet = dict(api_name=False, show_progress="hidden")
    triggers = [picker.change] + ([load.load] if load is not None else []) + ([tab.select] if tab is not None else [])
    for trigger in triggers:
        trigger(relist, [picker, parents], [parents], **quiet).then(on_preview, recipe_inputs, [shown], **quiet)
    parents.change(lambda c, ids, w: refill_weights(c, ids, w), [combination, parents, weights], [weights],
                   **quiet).then(on_preview, recipe_inputs, [shown], **quiet)
    combination.change(on_combination, [combination, parents, weights],
                       [density, svd_rank, combination_help, weights], **quiet).then(
        on_preview, recipe_inputs, [shown], **quiet)
    for widget in (weights, density, svd_rank):
        widget.change(on_preview, recipe_inputs, [shown], **quiet)
    # One combination at a time per app: each loads the base model.
    done = go.click(on_combine, [*recipe_inputs, name],
                    [result, made], api_name=False, concurrency_limit=1, concurrency_id="compose")
    done = done.then(relist, [picker, parents], [parents], **quiet)
    return ComposeHandles(done=done, made=made)
