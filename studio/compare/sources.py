"""Where Compare-tab adapters come from, what method each is, and whether a chat model fits.

An adapter folder is either PEFT's (``adapter_config.json`` + ``adapter_model.safetensors``) or
ours (``bottleneck_config.json``, see ``studio.adapters.bottleneck``). A run leaves one in
``adapter/`` when it finishes and one per ``checkpoints/checkpoint-N``; a user may also point at
any folder on disk. Nothing here imports torch: the UI lists adapters without loading anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from studio.adapters import derived
from studio.db import Database, RunStatus
from studio.methods import SettingError, all_methods, get_method

if TYPE_CHECKING:
    from studio.run_setup import DeviceFacts
    from studio.runspec import RunSpec

# studio.adapters.bottleneck.CONFIG_NAME, spelled out: that module imports torch, and the UI lists
# adapters at start-up without it (tests/test_chat.py checks the two agree).
BOTTLENECK_CONFIG = "bottleneck_config.json"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


class AdapterSourceError(ValueError):
    """A folder that cannot be attached as an adapter, with the folder and the reason."""


@dataclass(frozen=True)
class AdapterSource:
    label: str  # what the picker shows, unique within a project
    folder: Path
    method: str
    run_id: int | None = None
    step: int | None = None  # None: the run's final adapter


def detect_method(folder: str | Path) -> str:
    """The studio method an adapter folder holds; raises AdapterSourceError if it holds none."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise AdapterSourceError(f"{folder}: not a folder")
    if (folder / BOTTLENECK_CONFIG).is_file():
        return _recognised(folder / BOTTLENECK_CONFIG)
    config_path = folder / PEFT_CONFIG
    if not config_path.is_file():
        if (folder / "config.json").is_file():
            raise AdapterSourceError(f"{folder} holds a whole model, not an adapter: load it as the "
                                     "base model instead")
        raise AdapterSourceError(f"{folder} has no {PEFT_CONFIG} or {BOTTLENECK_CONFIG}: "
                                 "not an adapter folder")
    if not (folder / PEFT_WEIGHTS).is_file():
        # Only safetensors: a pickled adapter_model.bin is never loaded.
        raise AdapterSourceError(f"{folder} has no {PEFT_WEIGHTS} (pickled .bin adapters are not loaded)")
    return _recognised(config_path)


def _recognised(config_path: Path) -> str:
    """The first registered method (in the registry's order) that recognises this config."""
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterSourceError(f"{config_path}: unreadable ({exc})") from exc
    if not isinstance(config, dict):
        raise AdapterSourceError(f"{config_path}: not a JSON object")
    for spec in all_methods():
        if spec.recognises is not None and spec.recognises(config):
            return spec.name
    kind = config.get("peft_type") or config.get("method") or "(none)"
    raise AdapterSourceError(f"{config_path}: {kind} is not an adapter kind the studio serves")


def adapter_format(folder: str | Path) -> str:
    """How a recognised adapter folder is attached: "bottleneck" (the studio's own modules),
    "peft_lora" (a PEFT LoRA-type adapter: they share one view) or "peft" (any other PEFT adapter)."""
    folder = Path(folder)
    if (folder / BOTTLENECK_CONFIG).is_file():
        return "bottleneck"
    config = json.loads((folder / PEFT_CONFIG).read_text())
    return "peft_lora" if str(config.get("peft_type", "")).upper() == "LORA" else "peft"


def batchable(folder: str | Path) -> bool:
    """True where PEFT's mixed-batch ``adapter_names`` is implemented: plain LoRA-type adapters.

    DoRA raises there, and IA3 (like every non-LoRA tuner) silently ignores it, so every other
    adapter is answered on its own (see shared/notes/peft-facts.md)."""
    folder = Path(folder)
    if not (folder / PEFT_CONFIG).is_file():
        return False
    config = json.loads((folder / PEFT_CONFIG).read_text())
    return str(config.get("peft_type", "")).upper() == "LORA" and not config.get("use_dora")


def project_adapters(db: Database, project_id: int, folder_of) -> list[AdapterSource]:
    """Every attachable adapter of a project: each finished run's final adapter, then its checkpoints
    (but the last step's, which a completed run already offers as its final adapter).

    ``folder_of(run)`` gives a run's folder (``studio.runs.launch.run_folder``), passed in so
    that listing adapters does not import the worker package."""
    sources: list[AdapterSource] = []
    for run in db.list_runs(project_id):
        if _whole_model(run.method) or run.status == RunStatus.RUNNING.value or not run.folder:
            continue
        root = folder_of(run)
        final = root / "adapter"
        last_step = None  # a checkpoint of the last step holds the final adapter's weights: listed once
        if run.status == RunStatus.COMPLETED.value and _is_adapter(final):
            recipe = derived.recipe_of(run)  # a combined adapter says so: "#7 mix (ties of #3 + #5)"
            label = f"#{run.id} {run.name}" + (f" ({derived.short(recipe)})" if recipe is not None else "")
            sources.append(AdapterSource(label, final, run.method, run.id))
            last_step = db.last_step(run.id)
        for checkpoint in db.list_checkpoints(run.id):
            path = Path(checkpoint.path)
            if last_step is not None and checkpoint.step >= last_step:
                continue
            if _is_adapter(path):
                sources.append(AdapterSource(f"#{run.id} {run.name} @ step {checkpoint.step}", path,
                                             run.method, run.id, checkpoint.step))
    return sources


def _whole_model(method: str) -> bool:
    """The run saved a whole model, not an adapter (full, last N)."""
    try:
        return get_method(method).whole_model
    except SettingError:  # a method this version does not know: its folder decides (detect_method)
        return False


def _is_adapter(folder: Path) -> bool:
    return (folder / BOTTLENECK_CONFIG).is_file() or (folder / PEFT_WEIGHTS).is_file()


def chat_fits_beside_training(chat_bytes: int, training_bytes: int, gpu_total_bytes: int) -> str | None:
    """None when a chat model fits on a GPU next to a running training, else the reason.

    Both figures come from the closed-form estimator (``estimate_chat`` / ``estimate_training``);
    we keep 10 % of the card free for the allocator's fragmentation, as the Method tab's verdict
    does with its 85 % "fits" line."""
    from studio.estimate import gib

    budget = int(gpu_total_bytes * 0.9)
    if training_bytes + chat_bytes <= budget:
        return None
    return (f"not loaded: the chat model needs about {gib(chat_bytes)} and the running training "
            f"about {gib(training_bytes)}, together more than 90 % of the GPU's {gib(gpu_total_bytes)}. "
            "Wait for the training to finish, or load the chat model on the CPU.")


def chat_memory_refusal(db: Database, source: str, context: int = 2048, columns: int = 7) -> str | None:
    """Why a chat model for ``source`` must not be loaded on the GPU now, or None.

    Only a GPU is shared with a training run: on a CPU-only machine the chat model goes to RAM
    and the OS arbitrates. The training figure is the estimator's for the running run's own
    spec; the chat figure covers weights + KV cache for every column in one batch."""
    from studio.estimate import TrainSetup, estimate_chat
    from studio.planner import arch_for
    from studio.run_setup import device_facts
    from studio.runs.launch import active_run
    from studio.runspec import RunSpec

    device = device_facts()
    if device.kind != "cuda" or not device.total_bytes:
        return None
    chat = estimate_chat(arch_for(source), TrainSetup(dtype="bf16", device="cuda"), context, columns).total_bytes
    run = active_run(db)
    training = running_training_bytes(RunSpec.from_dict(run.spec), device) if run is not None else 0
    return chat_fits_beside_training(chat, training, device.total_bytes)


def running_training_bytes(spec: RunSpec, device: DeviceFacts) -> int:
    """The estimator's training memory for a run on ``device``, in the precision it trains in
    (``run_setup.training_setup``: auto on a GPU without bf16 is fp16 over fp32 weights)."""
    from studio.planner import arch_for, plan
    from studio.run_setup import training_setup

    setup = training_setup(spec, device).setup
    return plan(arch_for(spec.model), spec.method, spec.method_settings, setup)["total_bytes"]
