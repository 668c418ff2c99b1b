"""The memory estimates the Train and Method tabs show, from the session's run draft, through the
one translation ``run_setup.training_setup`` (the one the worker and the start service use), so a
tab cannot assume another precision or setup than the run gets.

The Train tab estimates for this machine. The Method tab may plan for another one: the GPU memory
figure and base quantisation in the draft are planning data, not training settings. Without a GPU
the verdict is against the available RAM (``run_setup.memory_budget``); a verdict of "exceeds" or
"tight" comes with what to change (``fit_advice.to_fit``, the worker's OOM advice rule).
No gradio here: handlers and tests call these with plain values.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from studio import run_setup
from studio.run_setup import DeviceFacts, SetupChoice
from studio.ui import labels
from studio.ui.draft import RunDraft

GIB = 2**30


def planned_device(draft: RunDraft, here: DeviceFacts) -> DeviceFacts:
    """The device the Method tab plans for: a GPU with the draft's memory figure when one is given
    (this machine's GPU, or one the user plans to train on), else this machine without a figure."""
    if draft.gpu_gib:
        bf16 = here.bf16_supported if here.kind == "cuda" else True  # a GPU planned elsewhere: a current one
        return DeviceFacts("cuda", int(draft.gpu_gib * GIB), bf16, None)
    return dataclasses.replace(here, free_bytes=None)


def distributed_choice(spec: Any) -> tuple[str, bool, int]:
    """(strategy, offload, processes per node as set) of a RunSpec (``distributed.strategy``)."""
    from studio.distributed.strategy import choices

    return choices(spec)


def planned_processes(spec: Any) -> int:
    """The processes the estimate is per-process for: the run's ``nproc_per_node``; 0 (automatic:
    every visible GPU) is planned as one, since the tabs do not know the GPUs it will find."""
    return max(1, distributed_choice(spec)[2])


def fit_notes(draft: RunDraft, model: str, device: DeviceFacts, result: dict[str, Any],
              quant: str = "none") -> list[str]:
    """What to say below a verdict: per GPU for which strategy (more than one process), the size
    warnings, and for "exceeds" or "tight" the single changes that lower the estimate, each with
    its figure (Markdown lines)."""
    from studio import fit_advice

    notes = [labels.FIT["warning"].format(text=w) for w in result.get("warnings", [])]
    setup = result.get("setup") or {}
    if setup.get("processes", 1) > 1:
        notes.insert(0, labels.FIT["per_process"].format(
            n=setup["processes"], strategy=labels.STRATEGY_NAMES.get(setup["strategy"], setup["strategy"]),
            offload=labels.FIT["offload"] if setup.get("offload") else ""))
    if result["verdict"] in ("exceeds", "tight"):
        spec = dataclasses.replace(draft.spec, model=model)
        try:
            rows = fit_advice.to_fit(spec, device, quant)
        except Exception as exc:  # advice on advice: never hides the estimate
            rows, notes = [], [*notes, labels.FIT["no_advice"].format(reason=exc)]
        if rows:
            notes.append(labels.FIT["advice"].format(lines="  \n".join(fit_advice.lines(rows))))
    return notes


def plan_draft(draft: RunDraft, model: str, device: DeviceFacts, quant: str = "none"
               ) -> tuple[dict[str, Any], SetupChoice]:
    """(the planner's result, the setup choice) for the draft's run of ``model`` on ``device``.
    Raises ValueError (a SettingError, a SetupError, a model that cannot be read) with the reason."""
    from studio.planner import arch_for, plan

    spec = draft.spec
    choice = run_setup.training_setup(spec, device)
    setup = choice.setup if quant == "none" else dataclasses.replace(choice.setup, quant=quant)
    strategy, offload, _ = distributed_choice(spec)
    # More than one process: the estimate is per GPU, for the run's strategy (distributed/memory.py).
    setup = dataclasses.replace(setup, processes=planned_processes(spec), strategy=strategy, offload=offload)
    budget, _ = run_setup.memory_budget(device)
    return plan(arch_for(model), spec.method, spec.method_settings, setup, budget), choice


def train_estimate(draft: RunDraft, model: str, device: DeviceFacts | None = None) -> str:
    """The Train tab's line: the estimate for the run Start would start, on this machine."""
    text = labels.TRAIN_ESTIMATE
    try:
        device = device or run_setup.device_facts(model)
        result, choice = plan_draft(draft, model, device)
    except Exception as exc:  # the estimate is advice; any failure is shown, never raised
        return text["failed"].format(reason=exc)
    spec = draft.spec
    head = text["head"].format(gib=result["total_bytes"] / GIB, title=result["title"],
                               params=result["trainable_params"], batch=spec.batch_size,
                               length=spec.max_length, precision=choice.precision, why=choice.reason)
    budget, where = run_setup.memory_budget(device)
    if budget is None:
        line = head + text["cpu"]
    else:
        line = head + text[where].format(free=budget / GIB, verdict=result["verdict"])
        if where == "RAM" and result["verdict"] == "exceeds":
            line += text["swap"]
    return "  \n".join([line, *fit_notes(draft, model, device, result)])
