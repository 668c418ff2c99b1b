"""The one translation from a RunSpec (and the device it will run on) to its training setup.

What precision a run trains in, and the ``TrainSetup`` the memory estimate needs, are decided
here and nowhere else: the Train and Method tabs, the start service, the worker's OOM advice,
the Compare tab's memory refusal and the worker itself (``worker/prepare.choose_compute``) all
call ``training_setup``, so an estimate cannot assume another precision than the run gets.

``device_facts`` describes this machine without importing torch (the UI process never does): the
GPU from ``sysinfo.probe_accelerators`` (a child process), and for the CPU the precision probe's
cached verdict for the model (``worker/precision.py`` measures it; ``probe_key`` is the cache key
both sides compute). The worker builds its ``DeviceFacts`` from torch instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from studio.estimate import TrainSetup
from studio.methods import SettingError, get_method
from studio.runspec import RunSpec

if TYPE_CHECKING:
    from studio.arch import ArchInfo

# ``bf16`` / ``fp32`` skip the CPU probe (tests, or a user who knows); ``measure`` or unset measures.
PROBE_ENV = "PEFT_STUDIO_PRECISION_PROBE"


class SetupError(ValueError):
    """A run that cannot train on this device as specified (fp16 or liger_kernel without a GPU);
    the message starts with the RunSpec field."""


@dataclass(frozen=True)
class DeviceFacts:
    kind: str  # "cuda" or "cpu"
    free_bytes: int | None  # the GPU's free memory; None on the CPU
    bf16_supported: bool  # the GPU supports bf16 (False on a CPU)
    # The CPU precision probe's cached verdict for this model (True: bf16 trains clearly faster),
    # None if never measured.
    cpu_bf16: bool | None
    total_bytes: int | None = None  # the GPU's memory; None on the CPU
    # The RAM available to a CPU run (psutil's "available": free plus reclaimable cache); None on
    # a GPU or when not read. Only the estimate's verdict reads it: a CPU run over it swaps (slow,
    # not fatal), so the start service never refuses on it.
    ram_available_bytes: int | None = None


@dataclass(frozen=True)
class SetupChoice:
    setup: TrainSetup  # what the memory estimate needs
    precision: str  # "bf16" | "fp16" | "fp32": what the run will train in
    reason: str  # one sentence, shown to the user


def probe_key(arch: "ArchInfo", torch_version: str, cpu: str) -> str:
    """The system-facts key of the CPU probe's verdict: what its timings depend on (the layer
    shapes, not the depth or the weights; the torch version; the CPU model)."""
    shape = "/".join(str(v) for v in (arch.model_type, arch.hidden_size, arch.intermediate_size,
                                      arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.vocab_size))
    return "/".join(["precision-probe", shape, torch_version, cpu])


def forced_cpu_precision() -> str | None:
    """``bf16`` or ``fp32`` when the environment decides for the probe, else None."""
    forced = os.environ.get(PROBE_ENV, "").strip().lower()
    return forced if forced in ("bf16", "fp32") else None


def cached_cpu_bf16(model: str | None, torch_version: str | None) -> bool | None:
    """The probe's verdict for ``model`` on this CPU, as the worker would read it; None when it was
    never measured (or the model's shapes cannot be read: the estimate then says so)."""
    forced = forced_cpu_precision()
    if forced is not None:
        return forced == "bf16"
    if not model or not torch_version:
        return None
    from studio import sysinfo
    from studio.planner import arch_for

    try:
        arch = arch_for(model)
    except Exception:  # an unreadable model: the estimate reports that error itself
        return None
    known = sysinfo.cached_fact(probe_key(arch, torch_version, sysinfo.cpu_model()))
    if isinstance(known, dict) and known.get("precision") in ("bf16", "fp32"):
        return known["precision"] == "bf16"
    return None


def device_facts(model: str | None = None) -> DeviceFacts:
    """This machine as a run on it would see it; no torch in this process. ``model``: the model
    whose cached CPU precision verdict to read (only used without a GPU)."""
    from studio import sysinfo

    accel = sysinfo.probe_accelerators()
    gpus = accel.get("gpus") or []
    if gpus:  # the worker trains on the first GPU
        gpu = gpus[0]
        return DeviceFacts("cuda", int(gpu["free_bytes"]), bool(gpu.get("bf16", False)), None,
                           int(gpu["total_bytes"]))
    return DeviceFacts("cpu", None, False, cached_cpu_bf16(model, accel.get("torch")),
                       ram_available_bytes=sysinfo.available_ram_bytes())


def memory_budget(device: DeviceFacts) -> tuple[int | None, str]:
    """(the bytes a run's estimate is judged against, what they are): the GPU's free memory on a
    GPU, the available RAM on the CPU (None: unknown, no verdict)."""
    if device.kind == "cuda":
        return device.free_bytes, "GPU"
    return device.ram_available_bytes, "RAM"


def choose_precision(requested: str, device: DeviceFacts) -> tuple[str, str]:
    """(precision the run trains in, why). ``auto``: on a GPU bf16 where supported, else fp16;
    on the CPU the probe's verdict, fp32 while it was never measured (its fallback)."""
    if device.kind != "cuda" and requested == "fp16":
        raise SetupError("runspec 'precision': fp16 training needs a GPU; use fp32 or bf16 on the CPU")
    if requested != "auto":
        return requested, "set in the run's settings"
    if device.kind == "cuda":
        if device.bf16_supported:
            return "bf16", "auto on a GPU that supports bf16"
        return "fp16", "auto on a GPU without bf16: fp16 mixed precision"
    if device.cpu_bf16 is None:
        return "fp32", ("auto on the CPU, not measured yet for this model: the run first times a "
                        "bf16 step against fp32 and may choose bf16; estimated as fp32")
    if device.cpu_bf16:
        return "bf16", "auto on the CPU: a bf16 step was measured clearly faster than fp32 here"
    return "fp32", "auto on the CPU: a bf16 step was not measured clearly faster than fp32 here"


def _method_refusal(spec: RunSpec, kind: str) -> str | None:
    """``MethodSpec.run_check`` on this device; a method or settings ``RunSpec.validate``
    refuses are left to it."""
    try:
        method = get_method(spec.method)
        params = method.params(spec.method_settings) if method.run_check else None
    except SettingError:
        return None
    return method.run_check(params, spec, kind) if method.run_check else None


def training_setup(spec: RunSpec, device: DeviceFacts) -> SetupChoice:
    """The precision ``spec`` trains in on ``device`` and the setup its memory estimate needs.

    fp16 runs keep fp32 weights under the Trainer's fp16 autocast (``prepare.choose_compute``
    loads them so), so their estimate counts fp32: an estimate must not fall short. A method's
    4-bit base is added by ``planner.plan`` from the method itself."""
    if spec.liger_kernel and device.kind != "cuda":  # its kernels are Triton: CUDA only
        raise SetupError("runspec 'liger_kernel': liger-kernel needs a CUDA GPU; turn it off on the CPU")
    refusal = _method_refusal(spec, device.kind)  # a method's own, on this device (GaLore 8-bit on a CPU)
    if refusal:
        raise SetupError(refusal)
    precision, reason = choose_precision(spec.precision, device)
    setup = TrainSetup(batch_size=spec.batch_size, seq_len=spec.max_length,
                       dtype="fp32" if precision == "fp16" else precision,
                       grad_checkpointing=spec.grad_checkpointing, optimizer=spec.optimizer,
                       device="cuda" if device.kind == "cuda" else "cpu")
    return SetupChoice(setup, precision, reason)
