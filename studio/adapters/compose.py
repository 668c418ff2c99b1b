"""Composing trained LoRA adapters into a new one (issue 17): PEFT's ``add_weighted_adapter``.

A composed adapter is a *derived run*: a completed row in ``runs`` with no worker, metrics or
checkpoints, whose ``recipe`` column says how it was made (``Recipe.as_dict``), and a run folder
made like a trained run's with the adapter in ``<run folder>/adapter/``, where Compare, Export
and Serve find a completed run's final adapter.

This module imports no torch or peft at module level: the UI process imports it for the recipe,
the checks and the History text; only ``compose`` loads the model.
"""

from __future__ import annotations

from dataclasses import dataclass
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


class CompositionError(ValueError):
    """A composition that cannot be made; the message names the run or field and what is
    expected, in one sentence."""


@dataclass(frozen=True)
class Recipe:
    """How a composed adapter is made: a combination of two or more parent runs' adapters."""

    combination: str
    parents: tuple[tuple[int, float], ...]
    density: float | None = None
    svd_rank: int | None = None

    def as_dict(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        raise NotImplementedError

    def describe(self, names: dict[int, str] | None = None) -> str:
        raise NotImplementedError


def composable_runs(db: Any, project_id: int) -> list:
    raise NotImplementedError


def check_recipe(db: Any, project_id: int, recipe: Recipe) -> list:
    raise NotImplementedError


def compose(db: Any, project_id: int, recipe: Recipe, name: str, *, device: str = "cpu") -> Any:
    raise NotImplementedError
