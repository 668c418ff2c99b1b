"""Setting up a bake-off: one run per method under a shared budget, queued through the worker.

The shared budget is what makes the figures comparable: the same data, steps, batch, maximum
length, seed and eval rows for every method. The learning rate is not shared by default: a
rate that suits LoRA leaves prompt tuning or IA3 nearly untrained in a short run (they train a
few thousand parameters and are usually run 10-100x hotter), which would measure the choice of
rate rather than the method. Each method's ``MethodSpec.default_learning_rate`` is its customary
rate (from the methods' papers and PEFT's examples, not tuned here; the LoRA family shares one on
purpose, so that rsLoRA's scale and LoRA+'s faster B are what differs); ``Budget.learning_rate``
overrides it with one rate for all. Method settings are each method's registry defaults.

Importing this module costs no torch: the UI process uses it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from studio.db import Bakeoff, Database, RunStatus
from studio.methods import get_method
from studio.runspec import EXACT_MATCH_ROWS, RunSpec

DEFAULT_METHODS = ["lora", "dora", "rslora", "loraplus", "qlora", "ia3", "prompt", "prefix", "houlsby"]

@dataclass
class Budget:
    """What every method of a bake-off gets."""

    max_steps: int = 40
    batch_size: int = 4
    max_length: int = 128
    eval_rows: int = EXACT_MATCH_ROWS  # eval rows generated for exact match (0: none), as a run's default
    learning_rate: float | None = None  # None: each method's default_learning_rate
    seed: int = 42

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Budget":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known})


def method_spec(model: str, method: str, budget: Budget, *, sample_task: str | None = None,
                dataset_id: int | None = None) -> RunSpec:
    """The RunSpec of one bake-off run: evaluate only at the end, no checkpoints (nothing to
    resume in a short comparison), the eval rows scored once on the saved adapter."""
    rate = get_method(method).default_learning_rate  # an unknown name fails before anything exists
    return RunSpec(model=model, method=method, method_settings={}, sample_task=sample_task,
                   dataset_id=dataset_id, max_steps=budget.max_steps, batch_size=budget.batch_size,
                   max_length=budget.max_length, seed=budget.seed,
                   learning_rate=budget.learning_rate or rate,
                   eval_steps=0, save_steps=0, exact_match_limit=budget.eval_rows).validate()


def start_bakeoff(db: Database, project_id: int, methods: list[str], budget: Budget, *,
                  sample_task: str | None = None, dataset_id: int | None = None,
                  name: str | None = None) -> Bakeoff:
    """Create one run per method, record the bake-off, queue the runs and dispatch the first.

    Nothing is created when a method or the budget is invalid. If another run is training, the
    bake-off waits in the queue behind it."""
    from studio.runs import launch

    methods = list(dict.fromkeys(methods))  # once each, in the order given
    if not methods:
        raise ValueError("choose at least one method")
    if (sample_task is None) == (dataset_id is None):
        raise ValueError("choose a sample task or a dataset (one of them)")
    project = db.get_project(project_id)
    if project is None:
        raise LookupError(f"no project with id {project_id}")
    specs = [method_spec(project.model_source, m, budget, sample_task=sample_task,
                         dataset_id=dataset_id) for m in methods]
    data = sample_task or f"dataset {dataset_id}"
    title = name or f"bake-off on {data}: {budget.max_steps} steps × {budget.batch_size} × {budget.max_length}"
    runs = [launch.create_run(db, project_id, spec, f"bake-off: {spec.method} on {data}") for spec in specs]
    row = db.create_bakeoff(project_id, title, project.model_source, methods, budget.to_dict(),
                            [r.id for r in runs], sample_task=sample_task, dataset_id=dataset_id)
    launch.enqueue(db, [r.id for r in runs])
    return db.get_bakeoff(row.id)


def cancel_bakeoff(db: Database, bakeoff_id: int) -> int:
    """Cancel the runs still waiting and stop (keeping nothing) the one training; returns how
    many runs were affected."""
    from studio.runs import launch

    row = db.get_bakeoff(bakeoff_id)
    touched = 0
    for run_id in row.run_ids:
        run = db.get_run(run_id)
        if run is None:
            continue
        if run.status == RunStatus.QUEUED.value or run.status == RunStatus.RUNNING.value:
            launch.stop(db, run_id, "discard")
            touched += 1
    return touched


def progress(db: Database, row: Bakeoff) -> dict[str, int]:
    """How many of the bake-off's runs are in each status (deleted runs count as "deleted")."""
    counts: dict[str, int] = {}
    for run_id in row.run_ids:
        run = db.get_run(run_id)
        status = run.status if run is not None else "deleted"
        counts[status] = counts.get(status, 0) + 1
    return counts


def is_finished(db: Database, row: Bakeoff) -> bool:
    counts = progress(db, row)
    return not counts.get(RunStatus.QUEUED.value) and not counts.get(RunStatus.RUNNING.value)
