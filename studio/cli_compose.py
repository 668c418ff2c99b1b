"""``peft-studio compose``: combine two or more trained LoRA adapters of one project into a new,
derived run (``studio.adapters.compose``), as the Export tab does.

    peft-studio compose --project P --combination ties --adapter 3=0.6 --adapter 5=0.4 \\
        --density 0.5 --name "dates + qa"

A refusal is one line on stderr and exit code 2, and nothing is created.
"""

from __future__ import annotations

import argparse
import json
import sys


def _parent(text: str) -> tuple[int, float]:
    run_id, sep, weight = text.partition("=")
    try:
        if not sep:
            raise ValueError(text)
        return int(run_id.strip()), float(weight.strip())
    except ValueError:
        raise ValueError(f"--adapter expects RUN_ID=WEIGHT (e.g. 3=0.5), got {text!r}") from None


def _cmd_compose(args: argparse.Namespace) -> int:
    from studio.adapters.compose import CompositionError, Recipe, compose
    from studio.db import Database
    from studio.serve.catalog import CatalogError, find_project

    db = Database()
    try:
        project = find_project(db, args.project)
        recipe = Recipe(args.combination, tuple(_parent(item) for item in args.adapter),
                        density=args.density, svd_rank=args.svd_rank)
        run = compose(db, project.id, recipe, args.name, device=args.device)
    except (CompositionError, CatalogError, ValueError) as exc:
        print(f"peft-studio compose: {exc}", file=sys.stderr)
        return 2
    finally:
        db.close()
    # One JSON object on stdout (``compose_child`` reads it back for the UI).
    print(json.dumps({"run_id": run.id, "name": run.name, "method": run.method, "folder": run.folder,
                      "recipe": run.recipe, "description": recipe.describe()}, indent=2))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from studio.adapters.compose import COMBINATIONS

    cmd = sub.add_parser("compose", help="combine trained LoRA adapters into a new one (PEFT's "
                                         "add_weighted_adapter), recorded as a derived run")
    cmd.add_argument("--project", required=True, help="the project, by name or id")
    cmd.add_argument("--combination", required=True, choices=list(COMBINATIONS),
                     help="linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune and their "
                          "_svd forms (cat and svd give the exact weighted sum of the updates)")
    cmd.add_argument("--adapter", action="append", default=[], metavar="RUN_ID=WEIGHT",
                     help="a completed LoRA run and its weight; give two or more")
    cmd.add_argument("--density", type=float, default=None,
                     help="the share of values TIES, DARE and magnitude pruning keep, in (0, 1]")
    cmd.add_argument("--svd-rank", type=int, default=None,
                     help="the rank of the SVD combinations (default: the largest parent rank)")
    cmd.add_argument("--name", required=True, help="the new run's name")
    cmd.add_argument("--device", default="cpu", help="cpu (default) or cuda: where the base is loaded")
    cmd.set_defaults(handler=_cmd_compose)
