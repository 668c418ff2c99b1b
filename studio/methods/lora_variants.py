"""Other low-rank / structured reparameterisations from PEFT: AdaLoRA, LoHa, LoKr, VeRA.

Per adapted Linear (in → out), with r the rank:
* AdaLoRA (Zhang et al. 2023): SVD-form P Λ Q with A ∈ R^{r×in}, B ∈ R^{out×r} and the singular
  values E ∈ R^r, pruned during training from ``init_r`` towards ``target_r``:
  r·(in + out) + r = r·(in + out + 1). (PEFT also keeps a non-trainable rank counter.)
* LoHa (Hyeon-Woo et al. 2022, FedPara): Hadamard product of two rank-r products,
  ΔW = (B₁A₁) ⊙ (B₂A₂): 2·r·(in + out).
* LoKr (Yeh et al. 2023, LyCORIS): Kronecker product ΔW = W₁ ⊗ W₂. out = a·b and in = c·d are
  factored near their square roots (a ≤ b, c ≤ d); W₁ is a×c (full), W₂ is b×d, stored full
  when r ≥ max(b, d)/2, else as a rank-r product r·(b + d).
* VeRA (Kopiczko et al. 2024): one frozen random pair (A, B) shared by all layers, and per layer
  two trainable scaling vectors d ∈ R^r and b ∈ R^out: r + out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from studio import activations
from studio.arch import ArchInfo
from studio.methods.base import (NO_OVERHEAD, REPARAMETERISATION, Advice, ApplyContext, Count, MethodSpec,
                                 SettingError, param, peft_type_is, per_module_sum, per_module_tensors, resolve_targets)
from studio.methods.lora import TARGET_PRESETS


@dataclass(frozen=True)
class TargetedParams:
    """The adapted-layer choice every method in this file shares."""

    target_preset: str = param("all-linear", "Which Linear layers to adapt.", choices=TARGET_PRESETS)
    target_modules: tuple = param((), "Custom module names (overrides the preset).", advanced=True)


@dataclass(frozen=True)
class AdaLoraParams(TargetedParams):
    init_r: int = param(12, "Starting rank of every adapted layer.", min=1, max=512)
    target_r: int = param(8, "Average rank after pruning.", min=1, max=512)
    lora_alpha: int = param(32, "Scale numerator α.", min=1, max=4096)
    total_step: int = param(1000, "Training steps (AdaLoRA schedules its pruning over them).", min=1, max=10**7)


@dataclass(frozen=True)
class LohaParams(TargetedParams):
    r: int = param(16, "Rank of each of the two factors.", min=1, max=512)
    alpha: int = param(16, "Scale numerator α.", min=1, max=4096)


@dataclass(frozen=True)
class LokrParams(TargetedParams):
    r: int = param(16, "Rank of the second Kronecker factor when it is decomposed.", min=1, max=512)
    alpha: int = param(16, "Scale numerator α.", min=1, max=4096)


@dataclass(frozen=True)
class VeraParams(TargetedParams):
    r: int = param(256, "Rank of the shared random matrices (VeRA uses high ranks: 256+).", min=1, max=4096)


def _targets(arch: ArchInfo, p: Any) -> list[str]:
    return resolve_targets(arch, p.target_preset, p.target_modules)


def adalora_count(arch: ArchInfo, p: AdaLoraParams) -> Count:
    r = p.init_r
    return per_module_sum(arch, _targets(arch, p), lambda g: r * (g.in_features + g.out_features + 1),
                          lambda g: f"{r} × ({g.in_features} + {g.out_features} + 1)",
                          "Σ init_r × (in + out + 1)")


def linear_only(arch: ArchInfo, targets: list[str], title: str) -> list[str]:
    """PEFT's LyCORIS adapters (LoHa, LoKr) handle nn.Linear, not GPT-2's transposed Conv1D."""
    conv = sorted({g.path for g in arch.matching(targets) if g.kind == "conv1d"})
    if conv:
        raise SettingError(f"{title} cannot adapt GPT-2-style Conv1D layers ({', '.join(conv)}); "
                           "use LoRA, AdaLoRA or IA3 on this model")
    return targets


def loha_count(arch: ArchInfo, p: LohaParams) -> Count:
    linear_only(arch, _targets(arch, p), "LoHa")
    return per_module_sum(arch, _targets(arch, p), lambda g: 2 * p.r * (g.in_features + g.out_features),
                          lambda g: f"2 × {p.r} × ({g.in_features} + {g.out_features})",
                          "Σ 2 × r × (in + out)")


def near_square_factors(dim: int) -> tuple[int, int]:
    """(m, k) with m·k = dim, m ≤ k, m the largest divisor not above √dim (LoKr's split)."""
    m = max(d for d in range(1, math.isqrt(dim) + 1) if dim % d == 0)
    return m, dim // m


def lokr_module_params(in_features: int, out_features: int, r: int) -> int:
    a, b = near_square_factors(out_features)
    c, d = near_square_factors(in_features)
    w1 = a * c
    w2 = b * d if r >= max(b, d) / 2 else r * (b + d)
    return w1 + w2


def lokr_count(arch: ArchInfo, p: LokrParams) -> Count:
    linear_only(arch, _targets(arch, p), "LoKr")

    def text(g: Any) -> str:
        a, b = near_square_factors(g.out_features)
        c, d = near_square_factors(g.in_features)
        w2 = f"{b}×{d}" if p.r >= max(b, d) / 2 else f"{p.r}×({b}+{d})"
        return f"({a}×{c} + {w2})"

    return per_module_sum(arch, _targets(arch, p),
                          lambda g: lokr_module_params(g.in_features, g.out_features, p.r), text,
                          "Σ (a·c + W₂), out = a·b, in = c·d")


def vera_count(arch: ArchInfo, p: VeraParams) -> Count:
    return per_module_sum(arch, _targets(arch, p), lambda g: p.r + g.out_features,
                          lambda g: f"({p.r} + {g.out_features})", "Σ (r + out)")


def adalora_tensors(arch: ArchInfo, p: AdaLoraParams) -> list[tuple[int, int]]:
    r = p.init_r  # A (r × in), B (out × r), singular values E (r × 1)
    return per_module_tensors(arch, _targets(arch, p), lambda g: [r * g.in_features, g.out_features * r, r])


def loha_tensors(arch: ArchInfo, p: LohaParams) -> list[tuple[int, int]]:
    r = p.r  # two Hadamard factors, each B (out × r) and A (r × in)
    return per_module_tensors(arch, _targets(arch, p),
                              lambda g: [g.out_features * r, r * g.in_features] * 2)


def lokr_tensors(arch: ArchInfo, p: LokrParams) -> list[tuple[int, int]]:
    def shapes(g: Any) -> list[int]:
        a, b = near_square_factors(g.out_features)
        c, d = near_square_factors(g.in_features)
        return [a * c] + ([b * d] if p.r >= max(b, d) / 2 else [b * p.r, p.r * d])
    return per_module_tensors(arch, _targets(arch, p), shapes)


def vera_tensors(arch: ArchInfo, p: VeraParams) -> list[tuple[int, int]]:
    return per_module_tensors(arch, _targets(arch, p), lambda g: [g.out_features, p.r])


def adalora_counters(arch: ArchInfo, p: AdaLoraParams) -> tuple[int, str]:
    """PEFT keeps one fp32 rank counter (``ranknum``) per adapted module, not trained."""
    counters = sum(g.count for g in arch.matching(_targets(arch, p)))
    return counters * 4, f"{counters:,} rank counters × 4 B"


def _apply(make_config: Any) -> Any:
    def apply(model: Any, arch: ArchInfo, p: Any, ctx: ApplyContext) -> Any:
        from peft import get_peft_model

        return get_peft_model(model, make_config(arch, p))
    return apply


def _adalora_config(arch: ArchInfo, p: AdaLoraParams):
    from peft import AdaLoraConfig

    return AdaLoraConfig(init_r=p.init_r, target_r=p.target_r, lora_alpha=p.lora_alpha,
                         total_step=p.total_step, target_modules=_targets(arch, p), task_type="CAUSAL_LM")


def _loha_config(arch: ArchInfo, p: LohaParams):
    from peft import LoHaConfig

    return LoHaConfig(r=p.r, alpha=p.alpha, target_modules=_targets(arch, p), task_type="CAUSAL_LM")


def _lokr_config(arch: ArchInfo, p: LokrParams):
    from peft import LoKrConfig

    return LoKrConfig(r=p.r, alpha=p.alpha, target_modules=_targets(arch, p), task_type="CAUSAL_LM")


def _vera_config(arch: ArchInfo, p: VeraParams):
    from peft import VeraConfig

    return VeraConfig(r=p.r, target_modules=_targets(arch, p), task_type="CAUSAL_LM")


def _spec(name: str, title: str, guidance: str, params_cls: type, count: Any, make_config: Any,
          tensors: Any, **hooks: Any) -> MethodSpec:
    return MethodSpec(name=name, title=title, family=REPARAMETERISATION, mergeable=True,
                      inference_overhead=NO_OVERHEAD, guidance=guidance, params_cls=params_cls,
                      count=count, apply=_apply(make_config), tensors=tensors,
                      recognises=peft_type_is(name.upper()), **hooks)


SPECS = [
    _spec("adalora", "AdaLoRA", "LoRA that moves rank to the layers that need it during training; "
          "worth it when a fixed budget must go far. Needs the total step count.",
          AdaLoraParams, adalora_count, _adalora_config, adalora_tensors, extra_state=adalora_counters,
          advice=Advice(large_data=True),
          activations=lambda arch, p, width: activations.low_rank(arch, _targets(arch, p), p.init_r, width)),
    _spec("loha", "LoHa", "A higher effective rank than LoRA for the same r (Hadamard of two "
          "low-rank products), at twice LoRA's parameters and more compute.",
          LohaParams, loha_count, _loha_config, loha_tensors,
          activations=lambda arch, p, width: activations.materialised_delta(arch, _targets(arch, p), width)),
    _spec("lokr", "LoKr", "Very few parameters for a full-rank-capable update (Kronecker product); "
          "popular for diffusion models, less tested on LLMs.", LokrParams, lokr_count, _lokr_config, lokr_tensors,
          activations=lambda arch, p, width: activations.materialised_delta(arch, _targets(arch, p), width)),
    _spec("vera", "VeRA", "Ten times fewer parameters than LoRA: shared frozen random matrices with "
          "tiny per-layer scales. Lower quality ceiling.", VeraParams, vera_count, _vera_config,
          vera_tensors, default_learning_rate=4e-3,  # frozen random projections, tiny vectors
          activations=lambda arch, p, width: activations.shared_projections(arch, _targets(arch, p), p.r)),
]
