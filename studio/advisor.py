"""The method advisor: rank every method for the user's constraints, one line of reasons each.

It is a decision table (the rules below, each with its reason) applied on top of the live
estimate: a method whose estimated training memory exceeds the device's memory (the GPU's free
memory, or the available RAM on a CPU: ``run_setup.memory_budget``) drops to the bottom whatever
else it has going for it. Scores are additive so every rule that fired shows in the reasons.

Rules (from the methods' papers and common practice, summarised in each spec's guidance; the
per-method points live on the methods, ``MethodSpec.advice``):
* fits the GPU or RAM (+3) / tight (+1) / exceeds (-10); unknown memory: no change.
* on a CPU, a 4-bit base (``MethodSpec.quantized``) -2: bitsandbytes de-quantises at every
  matmul there, slower than the same adapter over a bf16/fp32 base. A method that exceeds
  is re-estimated with gradient checkpointing; if that fits, it is scored so (-1 for the speed).
* must merge into the base for deployment: non-mergeable methods -10.
* many tasks on one base: small adapters +2 (< 0.5 % of the model), whole-model methods -3.
* quality first: DoRA +4, LoRA / rsLoRA / LoRA+ +2, full fine-tuning +4 when it fits; the
  virtual-token methods -2.
* few examples (< 1,000): few trainable parameters +2 (< 0.5 %); many (> 50,000): LoRA-family
  and full +1.
* baseline preference: LoRA +1 (the well-trodden default).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from studio.arch import ArchInfo
from studio.estimate import TrainSetup
from studio.methods import all_methods
from studio.methods.base import SettingError
from studio.planner import plan


@dataclass(frozen=True)
class Constraints:
    memory_bytes: int | None = None  # free GPU memory, or available RAM on a CPU; None: unknown
    where: str = "GPU"  # which of the two ("GPU" or "RAM"), for the reasons
    examples: int = 1000
    must_merge: bool = False
    many_tasks: bool = False
    quality_first: bool = False


@dataclass(frozen=True)
class Recommendation:
    method: str
    title: str
    score: int
    reasons: str
    trainable_params: int
    total_bytes: int
    verdict: str


def recommend(arch: ArchInfo, constraints: Constraints, setup: TrainSetup | None = None) -> list[Recommendation]:
    rows = []
    for spec in all_methods():
        try:
            estimate = plan(arch, spec.name, {}, setup, constraints.memory_bytes)
            if estimate["verdict"] == "exceeds" and not estimate["setup"]["grad_checkpointing"]:
                # Grounded in the estimate: say when checkpointing alone makes it fit.
                retry = plan(arch, spec.name, {}, replace(setup or TrainSetup(), grad_checkpointing=True),
                             constraints.memory_bytes)
                if retry["verdict"] != "exceeds":
                    estimate = {**retry, "verdict": retry["verdict"], "needs_checkpointing": True}
        except SettingError as exc:
            rows.append(Recommendation(spec.name, spec.title, -100, f"not applicable: {exc}", 0, 0, "n/a"))
            continue
        score, reasons = _score(spec, estimate, constraints)
        rows.append(Recommendation(spec.name, spec.title, score, "; ".join(reasons) or "no rule applies",
                                   estimate["trainable_params"], estimate["total_bytes"], estimate["verdict"]))
    return sorted(rows, key=lambda r: (-r.score, r.total_bytes))


def _score(spec: Any, estimate: dict[str, Any], c: Constraints) -> tuple[int, list[str]]:
    score, reasons = 0, []
    small = estimate["trainable_percent"] < 0.5

    def rule(points: int, reason: str) -> None:
        nonlocal score
        score += points
        reasons.append(reason)

    fit = estimate["verdict"]
    if estimate.get("needs_checkpointing"):
        rule(-1, "needs gradient checkpointing (~30 % slower)")
    if fit == "fits":
        rule(3, f"fits in {c.where} ({estimate['total_bytes'] / 2**30:.1f} GiB)")
    elif fit == "tight":
        rule(1, f"tight fit in {c.where} ({estimate['total_bytes'] / 2**30:.1f} GiB)")
    elif fit == "exceeds":
        rule(-10, f"needs {estimate['total_bytes'] / 2**30:.1f} GiB: exceeds the {c.where}")
    if c.where == "RAM" and spec.quantized:
        rule(-2, "4-bit base on a CPU: de-quantised at every matmul, slower than a bf16/fp32 base")
    if c.must_merge and not spec.mergeable:
        rule(-10, "cannot merge into the base")
    if c.many_tasks:
        if small:
            rule(2, "small per-task files over one base")
        if spec.whole_model:
            rule(-3, "a whole model per task")
    advice = spec.advice
    if c.quality_first and advice.quality and (not advice.quality_needs_fit or fit in ("fits", "unknown")):
        rule(advice.quality, advice.quality_reason)
    if c.examples < 1000 and small:
        rule(2, f"few trainable parameters suit {c.examples:,} examples")
    if c.examples > 50_000 and advice.large_data:
        rule(1, "capacity for a large dataset")
    if advice.default_choice:
        rule(1, "the well-trodden default")
    return score, reasons
