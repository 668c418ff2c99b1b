"""Which trained weights of a run can be exported: its final adapter (or whole model) and each
checkpoint still on disk.

A run that was stopped and saved, or that failed or ran out of memory after a checkpoint, has
trained weights worth keeping just as a completed run does; only its final ``adapter/`` folder
is missing. So an export names the weights it starts from: the final ones by default when the
run completed, else its latest checkpoint, or any checkpoint by its step. A run still training
offers nothing (its checkpoints rotate under it). Every folder offered lies inside the run's own
folder (a history row pointing elsewhere is skipped, never read).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.db import Database, RunStatus
from studio.export.target import ExportError
from studio.methods import get_method

WEIGHTS_FILE = "adapter_model.safetensors"  # PEFT's and our bottleneck adapters' weights
# Files of a Trainer checkpoint that are training state, never part of an export: the
# optimizer, scheduler and RNG states and the arguments are pickles, the state is the log.
TRAINING_STATE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl")
TRAINING_STATE_FILES = ("trainer_state.json",)


@dataclass(frozen=True)
class Weights:
    """One exportable set of trained weights of a run."""

    step: int | None  # the checkpoint's step; None: the final weights of a completed run
    path: Path
    label: str


def exportable(db: Database, run: Any) -> list[Weights]:
    """The run's exportable weights: the final ones first (completed runs), then its checkpoints,
    newest first. Empty for a running or waiting run, or one with nothing on disk."""
    from studio.runs.launch import RunFolderError, run_folder

    if run.status in (RunStatus.RUNNING.value, RunStatus.QUEUED.value) or not run.folder:
        return []
    try:
        folder = run_folder(db, run).resolve()
        whole = get_method(run.method).whole_model
    except (RunFolderError, KeyError, OSError):  # a folder not ours, a method this version lacks
        return []
    found = []
    final = folder / "adapter"
    if run.status == RunStatus.COMPLETED.value and _holds_weights(final, whole):
        step = db.last_step(run.id)
        found.append(Weights(None, final, "final weights" + (f" (step {step})" if step else "")))
    for checkpoint in sorted(db.list_checkpoints(run.id), key=lambda c: c.step, reverse=True):
        path = Path(checkpoint.path)
        try:
            inside = path.resolve().is_relative_to(folder)
        except (OSError, RuntimeError):
            inside = False
        if inside and _holds_weights(path, whole):
            found.append(Weights(checkpoint.step, path, f"checkpoint at step {checkpoint.step}"))
    return found


def pick(db: Database, run: Any, step: int | None = None) -> Weights:
    """The weights to export: ``step``'s checkpoint, or by default the final weights when there
    are some, else the latest checkpoint. ``ExportError`` saying what there is otherwise."""
    if run.status in (RunStatus.RUNNING.value, RunStatus.QUEUED.value):
        raise ExportError(f"run {run.id} is {run.status}; export it once it has finished or been stopped "
                          "(Stop and save keeps a checkpoint you can export)")
    found = exportable(db, run)
    if not found:
        raise ExportError(f"run {run.id} ({run.status}) has no trained weights on disk: neither a final "
                          "adapter nor a checkpoint (a run stopped without saving keeps none)")
    if step is None:
        return found[0]
    for weights in found:
        if weights.step == step:
            return weights
    steps = ", ".join(str(w.step) for w in found if w.step is not None) or "none"
    raise ExportError(f"run {run.id} has no checkpoint at step {step} (its checkpoints: {steps})")


def is_training_state(name: str) -> bool:
    """A file of a checkpoint folder that is training state, not weights an export carries."""
    return name.endswith(TRAINING_STATE_SUFFIXES) or name in TRAINING_STATE_FILES


def _holds_weights(folder: Path, whole_model: bool) -> bool:
    if not folder.is_dir():
        return False
    if whole_model:  # a whole model as save_pretrained writes it (one file or shards)
        return (folder / "config.json").is_file() and any(folder.glob("model*.safetensors"))
    return (folder / WEIGHTS_FILE).is_file()
