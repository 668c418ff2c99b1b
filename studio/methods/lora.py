"""LoRA and its switches: DoRA, rsLoRA, LoRA+ (and QLoRA, in qlora.py, on a 4-bit base).

LoRA (Hu et al. 2021) freezes W and learns ΔW = (α / r) · B A with A ∈ R^{r×in}, B ∈ R^{out×r},
B initialised to zero. Trainable parameters per adapted Linear: r·in + out·r = r·(in + out).
Under grouped-query attention k_proj / v_proj have out = num_kv_heads · head_dim, not d, which
is why we sum over the real module shapes instead of the textbook 2·d·r.

* DoRA (Liu et al. 2024) splits W into magnitude and direction and learns a magnitude vector per
  output feature: + out per adapted Linear.
* rsLoRA (Kalajdzievski 2023) scales by α / √r instead of α / r: same count.
* LoRA+ (Hayou et al. 2024) trains B with a learning rate λ times A's: same count; the trainer
  builds the optimizer with ``peft.optimizers.create_loraplus_optimizer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from studio import activations
from studio.arch import ArchInfo
from studio.methods.base import (NO_OVERHEAD, REPARAMETERISATION, Advice, ApplyContext, Count, MethodSpec, n,
                                 param, peft_type_is, per_module_sum, per_module_tensors, resolve_targets,
                                 with_defaults)

TARGET_PRESETS = ("attention", "mlp", "all-linear")


@dataclass(frozen=True)
class LoraParams:
    r: int = param(16, "Rank of the update B·A. Higher learns more, costs more; 8-64 is typical.",
                   min=1, max=1024, step=1)
    lora_alpha: int = param(32, "Scale numerator α: the update is multiplied by α/r (α/√r for "
                            "rsLoRA). Common choice: 2·r.", min=1, max=4096, step=1)
    lora_dropout: float = param(0.05, "Dropout on the adapter's input during training.",
                                min=0.0, max=0.5, step=0.01)
    target_preset: str = param("all-linear", "Which Linear layers get an adapter: attention "
                               "projections, the MLP, or every Linear in the blocks.",
                               choices=TARGET_PRESETS)
    target_modules: tuple = param((), "Custom module names (overrides the preset), e.g. "
                                  "q_proj,v_proj.", advanced=True)
    use_dora: bool = param(False, "DoRA: also learn a magnitude per output feature. Often "
                           "better at low rank; ~10-20% slower.")
    use_rslora: bool = param(False, "rsLoRA: scale by α/√r, which keeps high ranks stable.")
    loraplus_lr_ratio: float = param(1.0, "LoRA+: learning rate of B divided by that of A (1 = "
                                     "plain LoRA; the paper suggests 16).", min=1.0, max=64.0,
                                     step=1.0)


def targets(arch: ArchInfo, p: Any) -> list[str]:
    return resolve_targets(arch, p.target_preset, p.target_modules)


def lora_count(arch: ArchInfo, p: Any) -> Count:
    names = targets(arch, p)
    base = per_module_sum(arch, names, lambda g: p.r * (g.in_features + g.out_features),
                          lambda g: f"{p.r} × ({g.in_features} + {g.out_features})",
                          "Σ r × (in + out)")
    if not p.use_dora:
        return base
    magnitudes = sum(g.count * g.out_features for g in arch.matching(names))
    total = base.trainable + magnitudes
    return Count(total, f"{base.formula}; DoRA magnitudes Σ out = {n(magnitudes)}; "
                        f"total {n(base.trainable)} + {n(magnitudes)} = {n(total)}")


def lora_tensors(arch: ArchInfo, p: Any) -> list[tuple[int, int]]:
    """A (r × in) and B (out × r) per adapted Linear; DoRA adds a magnitude vector (out)."""
    return per_module_tensors(arch, targets(arch, p), lambda g: [p.r * g.in_features, g.out_features * p.r]
                              + ([g.out_features] if p.use_dora else []))


def lora_config(arch: ArchInfo, p: Any):
    from peft import LoraConfig

    return LoraConfig(
        r=p.r, lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout,
        target_modules=targets(arch, p), use_dora=p.use_dora, use_rslora=p.use_rslora,
        bias="none", task_type="CAUSAL_LM",
    )


def loraplus_optimizer(model: Any, p: Any, lr: float, weight_decay: float = 0.0,
                       optimizer_cls: Any = None) -> Any:
    """LoRA+'s optimizer: B matrices at ``loraplus_lr_ratio`` × the learning rate of A.

    Built by ``peft.optimizers.create_loraplus_optimizer``; ``None`` when the ratio is 1 (plain
    LoRA: the trainer's default optimizer is right)."""
    if p.loraplus_lr_ratio == 1.0:
        return None
    import torch
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(model=model, optimizer_cls=optimizer_cls or torch.optim.AdamW, lr=lr,
                                     loraplus_lr_ratio=p.loraplus_lr_ratio, weight_decay=weight_decay)


def lora_activations(arch: ArchInfo, p: Any, width: int) -> tuple[float, float]:
    return activations.low_rank(arch, targets(arch, p), p.r, width, dropout=p.lora_dropout > 0,
                                dora=p.use_dora)


def apply_lora(model: Any, arch: ArchInfo, p: Any, ctx: ApplyContext) -> Any:
    from peft import get_peft_model

    return get_peft_model(model, lora_config(arch, p))


GUIDANCE = {
    "lora": "The default: strong quality at a fraction of the memory of full fine-tuning, merges "
            "into the base with no inference cost, one small file per task.",
    "dora": "When plain LoRA at low rank underfits: usually closer to full fine-tuning at the "
            "same rank, a little slower to train; merges like LoRA.",
    "rslora": "When you want high ranks (64+): the α/√r scale keeps learning stable as r grows.",
    "loraplus": "Same cost as LoRA, often converges faster: B learns λ times faster than A.",
}


# What each variant's saved adapter_config.json says; LoRA+ saves a plain LoRA config.
RECOGNISES = {
    "lora": peft_type_is("LORA", use_dora=False, use_rslora=False),
    "dora": peft_type_is("LORA", use_dora=True),
    "rslora": peft_type_is("LORA", use_dora=False, use_rslora=True),
}


STRONG = Advice(2, "strong quality", large_data=True)
ADVICE = {
    "lora": Advice(2, "strong quality", large_data=True, default_choice=True),
    "dora": Advice(4, "closest to full fine-tuning at low rank", large_data=True),
    "rslora": STRONG, "loraplus": STRONG,
}


def _spec(name: str, title: str, **defaults: Any) -> MethodSpec:
    """A registered LoRA variant: LoRA's parameters with some switches on by default."""
    params_cls = with_defaults(LoraParams, f"{title.replace('+', 'Plus')}Params", **defaults)
    return MethodSpec(
        name=name, title=title, family=REPARAMETERISATION, mergeable=True,
        inference_overhead=NO_OVERHEAD, guidance=GUIDANCE[name], params_cls=params_cls,
        count=lora_count, apply=apply_lora, tensors=lora_tensors, optimizer=loraplus_optimizer,
        activations=lora_activations, quantized_variant="qlora", recognises=RECOGNISES.get(name),
        advice=ADVICE[name], composable=not params_cls().use_dora,
    )


LORA = _spec("lora", "LoRA")
DORA = _spec("dora", "DoRA", use_dora=True)
RSLORA = _spec("rslora", "rsLoRA", use_rslora=True, r=64, lora_alpha=16)
LORAPLUS = _spec("loraplus", "LoRA+", loraplus_lr_ratio=16.0)
SPECS = [LORA, DORA, RSLORA, LORAPLUS]
