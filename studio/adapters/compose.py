"""Composing trained LoRA adapters into a new one (issue 17), with PEFT's ``add_weighted_adapter``.

A composed adapter is a *derived run*: a completed row in ``runs`` with no worker, metrics or
checkpoints, whose ``recipe`` column says how it was made (``Recipe.as_dict``), ``method`` and
``spec`` those of its first parent (same base model), and a run folder named like a trained
run's with the adapter in ``<run folder>/adapter/``, where Compare, Export and Serve find a
completed run's final adapter. Its ``recipe.json`` says the same for someone reading the folder.

What PEFT computes, per adapted Linear, for parents i with weights w_i, LoRA factors A_i (r×in),
B_i (out×r) and scaling s_i (α/r, or α/√r for rsLoRA); the new adapter has scaling α/r = 1:

* ``cat``:    A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1 B_2 ...]: BA = Σ w_i s_i B_i A_i,
  exactly the weighted sum of the updates; rank Σ r_i.
* ``linear``: A = Σ sign(w_i) √|w_i s_i| A_i, B = Σ √|w_i s_i| B_i, so BA = Σ_i Σ_j (...) B_i A_j
  holds cross terms B_i A_j: *not* the weighted sum of the updates unless one parent is nonzero
  (fast, rough); same rank required.
* ``ties`` / ``dare_*`` / ``magnitude_prune``: the same split into A and B, each pruned (keep a
  ``density`` share) and combined; same rank required.
* ``*svd``: the full updates ΔW_i = s_i B_i A_i combined (weighted sum, TIES, DARE, pruning), then
  truncated by SVD to ``svd_rank`` (default: the largest parent rank).

PEFT folds every parent's own scaling into the new factors, so LoRA and rsLoRA parents mix
correctly; PEFT then gives the new adapter the first parent's config with α = r, which for an
rsLoRA first parent means a scaling of √r, not 1: ``compose_build`` divides B by it.

This module imports no torch or peft at module level: the UI process imports it for the recipe,
the checks and the History text; only ``compose`` loads the model (``compose_build``).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# PEFT's combination types (``LoraModel.add_weighted_adapter``), with what each does.
COMBINATIONS: dict[str, str] = {
    "linear": "weighted sum of the A and of the B matrices separately (each scaled by the square "
              "root of weight x scaling); fast, a rough approximation; same rank required",
    "cat": "the parents' A and B stacked: exactly the weighted sum of their updates; rank = sum "
           "of the ranks",
    "svd": "the exact weighted sum of the updates, truncated by SVD to the SVD rank",
    "ties": "TIES on A and B: keep the largest values (density), elect a sign, average the "
            "agreeing ones; same rank required",
    "ties_svd": "TIES on the full updates, then SVD to the SVD rank",
    "dare_linear": "DARE: drop values at random (keep density, rescale), then the weighted sum; "
                   "on A and B; same rank required",
    "dare_ties": "DARE's random drop, then TIES's sign election; on A and B; same rank required",
    "dare_linear_svd": "DARE then weighted sum on the full updates, then SVD to the SVD rank",
    "dare_ties_svd": "DARE then TIES on the full updates, then SVD to the SVD rank",
    "magnitude_prune": "keep the largest values (density), then the weighted sum; on A and B; "
                       "same rank required",
    "magnitude_prune_svd": "magnitude pruning on the full updates, then SVD to the SVD rank",
}
# The combinations that prune (TIES, DARE, magnitude): they need ``density``, the others refuse it.
NEEDS_DENSITY: frozenset[str] = frozenset(
    name for name in COMBINATIONS if name.startswith(("ties", "dare", "magnitude")))
# Combined on A and B separately: every parent must have the same rank (PEFT's own condition).
SAME_RANK: frozenset[str] = frozenset(
    {"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"})
# Reduced to a rank by SVD: they take ``svd_rank`` (None: the largest parent rank).
SVD: frozenset[str] = frozenset(name for name in COMBINATIONS if name.endswith("svd"))
MAX_PARENTS = 32  # a UI list, not a library: more is a mistake, and each one is loaded
RECIPE_FILE = "recipe.json"
WORK_PREFIX = ".compose-"  # the temporary folder inside the runs folder, until it is placed
STALE_S = 24 * 3600
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_WORDS = {"ties": "TIES", "dare": "DARE", "svd": "SVD", "cat": "concatenation",
          "magnitude": "magnitude", "prune": "prune", "linear": "linear"}


class CompositionError(ValueError):
    """A composition that cannot be made; the message names the run or field and what is
    expected, in one sentence. Nothing was created."""


@dataclass(frozen=True)
class Recipe:
    """How a composed adapter is made: a combination of two or more parent runs' adapters."""

    combination: str  # a key of COMBINATIONS
    parents: tuple[tuple[int, float], ...]  # (run id, weight), at least two
    density: float | None = None  # (0, 1], required for NEEDS_DENSITY, else None
    svd_rank: int | None = None  # the svd combinations' rank (None: PEFT's default)

    def as_dict(self) -> dict:
        """What ``runs.recipe`` stores (JSON)."""
        return {"combination": self.combination,
                "parents": [{"run_id": run_id, "weight": weight} for run_id, weight in self.parents],
                "density": self.density, "svd_rank": self.svd_rank}

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        """The recipe ``as_dict`` wrote; ``CompositionError`` for anything else."""
        try:
            parents = tuple((int(p["run_id"]), float(p["weight"])) for p in data["parents"])
            density, rank = data.get("density"), data.get("svd_rank")
            return cls(str(data["combination"]), parents,
                       None if density is None else float(density), None if rank is None else int(rank))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CompositionError(f"a recipe must be {{'combination', 'parents': [{{'run_id', "
                                   f"'weight'}}], 'density', 'svd_rank'}}; this one is not ({exc!r})") from None

    def describe(self, names: dict[int, str] | None = None) -> str:
        """``TIES (density 0.5) of #3 dates-lora × 0.6 + #5 qa-lora × 0.4``."""
        words = [_WORDS.get(part, part) for part in self.combination.split("_")]
        title = " ".join(words)
        title = title[0].upper() + title[1:] if title else title
        extras = ([f"density {self.density:g}"] if self.density is not None else []) + \
                 ([f"SVD rank {self.svd_rank}"] if self.svd_rank is not None else [])
        if extras:
            title += f" ({', '.join(extras)})"
        terms = []
        for run_id, weight in self.parents:
            name = (names or {}).get(run_id)
            terms.append(f"#{run_id}{' ' + name if name else ''} × {weight:g}")
        return f"{title} of {' + '.join(terms)}"


def composable_runs(db: Any, project_id: int) -> list:
    """The project's completed runs whose final adapter can be composed (newest first, as
    ``db.list_runs``): a composable method and a plain PEFT LoRA adapter in ``adapter/``."""
    found = []
    for run in db.list_runs(project_id):
        try:
            _parent_problem(db, project_id, run, run.id)
        except CompositionError:
            continue
        found.append(run)
    return found


def check_recipe(db: Any, project_id: int, recipe: Recipe) -> list:
    """The parent runs, in the recipe's order, or ``CompositionError`` saying what is wrong."""
    _check_shape(recipe)
    runs = [_parent_problem(db, project_id, db.get_run(run_id), run_id) for run_id, _ in recipe.parents]
    configs = [_adapter_config(db, run) for run in runs]
    _check_same_base(runs)
    _check_ranks(recipe, runs, configs)
    return runs


def compose(db: Any, project_id: int, recipe: Recipe, name: str, *, device: str = "cpu") -> Any:
    """Check, build, save and record the composed adapter; returns the new derived run (status
    completed, ``recipe`` set). Built in a temporary folder inside the project's runs folder,
    then moved into place inside the transaction that records the row: a failure anywhere
    leaves no row and no folder."""
    from studio.adapters import compose_build
    from studio.db import NAME_MAX
    from studio.runs.launch import folder_name, run_folder, runs_root

    title = (name or "").strip()
    if not title or len(title) > NAME_MAX:
        raise CompositionError(f"name: give the composed adapter a name of 1 to {NAME_MAX} characters"
                               f" (got {len(title)})")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise CompositionError(f"device: 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}")
    parents = check_recipe(db, project_id, recipe)
    _check_device(db, device)
    root = runs_root(db, project_id)
    root.mkdir(parents=True, exist_ok=True)
    _sweep_stale(root)
    work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir=root))
    placed: list[Path] = []
    try:
        folders = [run_folder(db, run) / "adapter" for run in parents]
        compose_build.build(parents[0].spec, folders, [w for _, w in recipe.parents], recipe,
                            work / "adapter", device)
        (work / RECIPE_FILE).write_text(json.dumps(
            {**recipe.as_dict(), "description": recipe.describe({r.id: r.name for r in parents})},
            indent=2) + "\n", encoding="utf-8")

        def place(run_id: int) -> str:
            folder = folder_name(run_id, title)
            dest = root / folder
            if dest.exists():  # a leftover of a deleted run: never ours to replace
                raise CompositionError(f"the folder {dest} already exists; move it aside and compose again")
            work.rename(dest)  # same filesystem (inside runs/): atomic
            placed.append(dest)
            return folder

        try:
            return db.create_derived_run(project_id, title, parents[0].method, dict(parents[0].spec),
                                         recipe.as_dict(), place)
        except BaseException:
            for dest in placed:  # the row did not commit: its folder goes too
                shutil.rmtree(dest, ignore_errors=True)
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)  # gone already once placed


def _sweep_stale(root: Path) -> None:
    """Remove work folders a killed composition left (a finally clause cannot run after kill -9):
    only ours, by prefix, and only a day old, so a composition running now keeps its own."""
    import time

    for item in root.glob(f"{WORK_PREFIX}*"):
        try:
            if item.is_dir() and not item.is_symlink() and time.time() - item.stat().st_mtime > STALE_S:
                shutil.rmtree(item, ignore_errors=True)
        except OSError:
            continue


# ---- checks (no torch) ----

def _check_shape(recipe: Recipe) -> None:
    """The recipe's own fields, before any run is looked at."""
    if recipe.combination not in COMBINATIONS:
        raise CompositionError(f"combination: {recipe.combination!r} is not one of PEFT's "
                               f"combinations ({', '.join(COMBINATIONS)})")
    parents = recipe.parents
    if not isinstance(parents, (tuple, list)) or len(parents) < 2:
        count = len(parents) if isinstance(parents, (tuple, list)) else 0
        raise CompositionError(f"adapters: a composition needs at least two parent runs, got {count}")
    if len(parents) > MAX_PARENTS:
        raise CompositionError(f"adapters: at most {MAX_PARENTS} parent runs, got {len(parents)}")
    seen: set[int] = set()
    for item in parents:
        run_id, weight = item if isinstance(item, (tuple, list)) and len(item) == 2 else (None, None)
        if isinstance(run_id, bool) or not isinstance(run_id, int):
            raise CompositionError(f"adapters: each parent is (run id, weight), got {item!r}")
        if run_id in seen:
            raise CompositionError(f"adapters: run {run_id} is listed twice; give each run once "
                                   "with its weight")
        seen.add(run_id)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise CompositionError(f"weight of run {run_id}: a finite number, got {weight!r}")
    if all(weight == 0 for _, weight in parents):
        raise CompositionError("weights: all are 0, which composes nothing; give at least one "
                               "parent a nonzero weight")
    density = recipe.density
    if recipe.combination in NEEDS_DENSITY:
        if isinstance(density, bool) or not isinstance(density, (int, float)) \
                or not (0 < density <= 1):
            raise CompositionError(f"density: {recipe.combination} keeps this share of the values, "
                                   f"a number in (0, 1] such as 0.5; got {density!r}")
    elif density is not None:
        raise CompositionError(f"density: {recipe.combination} does not prune, so it takes no density "
                               f"(only {', '.join(sorted(NEEDS_DENSITY))} do); got {density!r}")
    rank = recipe.svd_rank
    if recipe.combination in SVD:
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise CompositionError(f"svd_rank: a whole number from 1 (or none for the largest "
                                   f"parent rank), got {rank!r}")
    elif rank is not None:
        raise CompositionError(f"svd_rank: only the SVD combinations ({', '.join(sorted(SVD))}) "
                               f"take a rank; {recipe.combination} got {rank!r}")


def _parent_problem(db: Any, project_id: int, run: Any, run_id: int) -> Any:
    """``run`` if it can be a parent, else ``CompositionError`` naming it and why."""
    from studio.db import RunStatus
    from studio.methods import SettingError, get_method

    if run is None or run.project_id != project_id:
        raise CompositionError(f"run {run_id}: this project has no run {run_id}")
    label = f"run {run.id} ('{run.name}')"
    if run.status != RunStatus.COMPLETED.value:
        raise CompositionError(f"{label} is {run.status}; only completed runs have a final adapter "
                               "to compose")
    try:
        method = get_method(run.method)
    except SettingError:
        raise CompositionError(f"{label}: its method {run.method!r} is unknown to this version") from None
    if not method.composable:
        can = ", ".join(sorted(m.name for m in _all_methods() if m.composable))
        raise CompositionError(f"{label} is {method.title}, which cannot be composed: PEFT combines "
                               f"LoRA adapters only ({can})")
    _adapter_config(db, run)
    return run


def _adapter_config(db: Any, run: Any) -> dict:
    """The parent's final adapter config, checked to be one add_weighted_adapter combines."""
    from studio.runs.launch import RunFolderError, run_folder

    label = f"run {run.id} ('{run.name}')"
    try:
        folder = run_folder(db, run) / "adapter"
    except RunFolderError as exc:
        raise CompositionError(str(exc)) from None
    if not (folder / ADAPTER_WEIGHTS).is_file() or not (folder / ADAPTER_CONFIG).is_file():
        raise CompositionError(f"{label} has no final adapter on disk ({folder} lacks "
                               f"{ADAPTER_CONFIG} or {ADAPTER_WEIGHTS})")
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CompositionError(f"{label}: its {ADAPTER_CONFIG} cannot be read ({exc})") from None
    if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "LORA":
        raise CompositionError(f"{label}: its adapter is not a PEFT LoRA adapter")
    if config.get("use_dora"):
        raise CompositionError(f"{label} was trained with DoRA (use_dora), whose magnitude vectors "
                               "PEFT does not combine")
    if config.get("modules_to_save") or config.get("target_parameters"):
        raise CompositionError(f"{label} trains whole modules or parameters beside LoRA "
                               "(modules_to_save / target_parameters), which PEFT cannot combine")
    if config.get("bias", "none") != "none":
        raise CompositionError(f"{label} trains biases (bias={config.get('bias')!r}), which PEFT's "
                               "combination drops")
    return config


def _check_same_base(runs: list) -> None:
    """One base model: the same model source, and all quantised or none (a QLoRA adapter
    learnt the corrections of its 4-bit base)."""
    from studio.methods import get_method
    from studio.serve.catalog import same_source

    first = runs[0]
    model = str((first.spec or {}).get("model", ""))
    for run in runs[1:]:
        other = str((run.spec or {}).get("model", ""))
        if not same_source(model, other):
            raise CompositionError(f"run {run.id} ('{run.name}') was trained on {other}, run {first.id} "
                                   f"on {model}: only adapters of one base model can be composed")
        if get_method(run.method).quantized != get_method(first.method).quantized:
            raise CompositionError(f"runs {first.id} ({first.method}) and {run.id} ({run.method}): one "
                                   "trained over a 4-bit base and one over the full-precision base; "
                                   "compose adapters of one kind of base")


def _rank(config: dict) -> int:
    pattern = config.get("rank_pattern") or {}
    return max([int(config.get("r", 8)), *map(int, pattern.values())])


# Config keys PEFT copies from the first parent into the new adapter: a parent that differs
# would lose the layers the first one leaves out (its update there silently dropped).
_COPIED_FROM_FIRST = ("layers_to_transform", "layers_pattern", "exclude_modules", "layer_replication")


def _check_ranks(recipe: Recipe, runs: list, configs: list[dict]) -> None:
    """What PEFT can combine: ranks (for the A/B combinations), target kinds, the layers."""
    for key in _COPIED_FROM_FIRST:
        values = [configs[0].get(key) or None, *(c.get(key) or None for c in configs[1:])]
        for run, value in zip(runs[1:], values[1:]):
            if value != values[0]:
                raise CompositionError(f"run {run.id} ('{run.name}') has {key}={value!r} and run "
                                       f"{runs[0].id} {key}={values[0]!r}: PEFT keeps the first "
                                       "parent's, which would drop part of the others' updates")
    kinds = {type(c.get("target_modules")).__name__ for c in configs}
    if "str" in kinds and len(kinds) > 1:
        raise CompositionError("target modules: PEFT cannot mix adapters that name their modules by "
                               "a pattern with adapters that list them; compose either kind alone")
    ranks = [_rank(c) for c in configs]
    if recipe.combination in SAME_RANK:
        patterned = [run for run, c in zip(runs, configs) if c.get("rank_pattern")]
        if len(set(ranks)) > 1 or patterned:
            listed = ", ".join(f"run {run.id} r={rank}" for run, rank in zip(runs, ranks))
            raise CompositionError(f"{recipe.combination} combines A and B matrices directly, so every "
                                   f"parent needs one rank throughout ({listed}); use cat or an SVD "
                                   "combination for mixed ranks")
    if recipe.combination in SVD and recipe.svd_rank is not None and recipe.svd_rank > sum(ranks):
        raise CompositionError(f"svd_rank: at most {sum(ranks)}, the sum of the parents' ranks (the "
                               f"most the combined update can have); got {recipe.svd_rank}")


def _check_device(db: Any, device: str) -> None:
    """Composing loads the base model: on a device there is, and not where a run is training."""
    import torch

    from studio.runs.launch import active_run

    if device != "cpu" and not torch.cuda.is_available():
        raise CompositionError(f"device: {device} was asked for but this machine has no CUDA GPU "
                               "torch can use; compose on the cpu")
    busy = active_run(db)
    if busy is None:
        return
    if device == "cpu" and torch.cuda.is_available():  # training on the GPU, this on the CPU
        return
    raise CompositionError(f"run {busy.id} ('{busy.name}') is training on this machine; composing "
                           "loads the base model on the same device, which would take its memory. "
                           "Compose once it has finished, or stop it")


def _all_methods() -> list:
    from studio.methods import all_methods

    return all_methods()
