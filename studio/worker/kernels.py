"""Maintained CUDA kernels for training, behind the run's own switch: liger-kernel.

What a GPU user gets with ``"liger_kernel": true`` in the RunSpec (the Train tab's "Liger kernels"
box, ``peft-studio train`` with the same field), on a CUDA device with ``pip install
"peft-studio[cuda]"``: liger-kernel's Triton kernels for RMSNorm, RoPE and SwiGLU, and its fused
linear cross-entropy, patched into the model *before* the PEFT method wraps it (the kernels call
the projections, so LoRA's wrapped ``Linear`` layers still run). The fused loss is liger's way of
never building the b × s × V logits; the studio's own label-only loss (``label_loss.py``) is the
other way, and the two cannot be stacked, so a liger run hands the loss to the model.

Why off by default and refused rather than skipped: liger changes the arithmetic (fused kernels
round differently), so it must never switch itself on; and a run that asked for it must not
silently train without it. ``bench/gpu_check.py`` times a LoRA run with and without it; the
figures are in ``docs/benchmarks.md``. Liger needs Triton on CUDA: there is no CPU path.
"""

from __future__ import annotations

from typing import Any

# Set on a patched model: the trainer then leaves the loss to the model (liger's fused one).
FUSED_LOSS_ATTR = "studio_fused_loss"
INSTALL_HINT = 'pip install "peft-studio[cuda]" (or pip install liger-kernel)'


class KernelError(RuntimeError):
    """The run asked for kernels this machine or model cannot have; the message says why."""


def liger_patcher(model_type: str, device: str) -> Any:
    """liger-kernel's ``apply_liger_kernel_to_<family>`` for this model type, or KernelError
    naming what is missing (a CUDA device, the package, support for the model family)."""
    if device != "cuda":
        raise KernelError("liger_kernel needs a CUDA GPU (its kernels are Triton); this run trains on "
                          f"the {device.upper()}: turn liger_kernel off")
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as exc:
        raise KernelError(f"liger_kernel is on but liger-kernel is not installed ({exc}): {INSTALL_HINT}") from exc
    patch = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if patch is None:
        known = ", ".join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))
        raise KernelError(f"liger-kernel has no kernels for model type '{model_type}' (it has: {known}); "
                          "turn liger_kernel off for this model")
    return patch


def apply_liger(model: Any, device: str) -> str:
    """Patch the loaded model (before the PEFT method is applied) and say what was done."""
    patch = liger_patcher(getattr(model.config, "model_type", "") or "", device)
    # Only the arguments this family's patcher takes (they differ: some have no SwiGLU, Gemma has
    # GeGLU); the fused loss on, liger's plain cross-entropy off (the two are exclusive).
    import inspect

    wanted = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
              "fused_linear_cross_entropy": True, "model": model}
    accepted = inspect.signature(patch).parameters
    patch(**{k: v for k, v in wanted.items() if k in accepted})
    setattr(model, FUSED_LOSS_ATTR, "liger-kernel's fused linear cross-entropy never builds the full logits either")
    applied = [k for k in ("rope", "rms_norm", "swiglu", "fused_linear_cross_entropy") if k in accepted]
    return f"liger-kernel applied ({', '.join(applied)}); the loss is liger's fused linear cross-entropy"
