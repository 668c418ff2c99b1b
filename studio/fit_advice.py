"""What to change when a run does not fit its device: the same run with one knob changed, each
estimated, torch-free.

One rule for two readers: the worker's out-of-memory message (``worker/train.oom_advice``) and
the Method and Train tabs, when their verdict is "exceeds" or "tight". The alternatives are a
smaller batch (with more accumulation, so the effective batch stays), gradient checkpointing, the
method's 4-bit variant (``MethodSpec.quantized_variant``, with the run's settings carried over)
and a shorter max length; each is estimated through ``run_setup.training_setup`` (the precision
the run trains in) and ``planner.plan``, and judged against ``run_setup.memory_budget`` (the GPU's
free memory, or the available RAM on a CPU).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from studio.methods import get_method
from studio.run_setup import DeviceFacts, memory_budget, training_setup
from studio.runspec import RunSpec

GIB = 2**30


@dataclass(frozen=True)
class Alternative:
    label: str  # the one change, in words ("gradient checkpointing on")
    total_bytes: int
    verdict: str  # fits / tight / exceeds / unknown, against the device's budget


def alternatives(spec: RunSpec, device: DeviceFacts, quant: str = "none") -> list[Alternative]:
    """The run as configured first, then each single change that applies. ``quant``: a planned
    base quantisation (the Method tab's planning figure), kept in every alternative."""
    from studio.planner import arch_for, plan

    arch = arch_for(spec.model)
    base = training_setup(spec, device).setup
    if quant != "none":
        base = replace(base, quant=quant)
    budget, _ = memory_budget(device)
    method = get_method(spec.method)
    settings = spec.method_settings
    options = [("as configured", spec.method, settings, base)]
    halved = replace(spec, batch_size=max(1, spec.batch_size // 2), grad_accum=spec.grad_accum * 2)
    if spec.batch_size > 1 and not (method.run_check and method.run_check(
            method.params(settings), halved, device.kind)):  # layer-wise GaLore cannot accumulate
        options.append((f"batch size {max(1, spec.batch_size // 2)} (accumulate ×{spec.grad_accum * 2})",
                        spec.method, settings, replace(base, batch_size=max(1, spec.batch_size // 2))))
    if not spec.grad_checkpointing:
        options.append(("gradient checkpointing on", spec.method, settings,
                        replace(base, grad_checkpointing=True)))
    if method.quantized_variant:
        variant = get_method(method.quantized_variant)
        # The run's settings, with the method's own defaults, as far as the variant has them.
        known = {f.name for f in variant.fields()}
        carried = {k: v for k, v in asdict(method.params(settings)).items() if k in known}
        options.append((f"{variant.title} (4-bit base)", variant.name, carried, base))
    if spec.max_length > 128:
        options.append((f"max length {spec.max_length // 2}", spec.method, settings,
                        replace(base, seq_len=spec.max_length // 2)))
    rows = []
    for label, name, chosen, setup in options:
        result = plan(arch, name, chosen, setup, budget)
        rows.append(Alternative(label, result["total_bytes"], result["verdict"]))
    return rows


def lines(rows: list[Alternative]) -> list[str]:
    """One Markdown list line per alternative: ``- label: 1.23 GiB (fits)``."""
    return [f"- {r.label}: {r.total_bytes / GIB:.2f} GiB ({r.verdict})" for r in rows]


def oom_text(spec: RunSpec, device: DeviceFacts) -> str:
    """The worker's advice after an out-of-memory error (the run as configured included)."""
    return "\n".join(["Estimated memory for the same run with one change:", *lines(alternatives(spec, device))])


def to_fit(spec: RunSpec, device: DeviceFacts, quant: str = "none") -> list[Alternative]:
    """The changes worth naming when the run as configured exceeds or is tight on ``device``:
    every single change that lowers the estimate, those that fit first (smallest first)."""
    rows = alternatives(spec, device, quant)
    configured, rest = rows[0], rows[1:]
    better = [r for r in rest if r.total_bytes < configured.total_bytes]
    rank = {"fits": 0, "tight": 1, "unknown": 2, "exceeds": 3}
    return sorted(better, key=lambda r: (rank.get(r.verdict, 3), r.total_bytes))
