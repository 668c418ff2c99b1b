"""Houlsby bottleneck adapters as a method spec; the module itself is studio/adapters/bottleneck.py.

count = L × 2 × (2·d·r + r + d): two adapters per block, each a down-projection d→r with bias
and an up-projection r→d with bias. For d = 4096, L = 32, r = 64: 32 × 2 × (524,288 + 64 + 4,096)
= 33,820,672 (the seeds' "≈ 33.6M" omits the biases).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from studio import activations
from studio.arch import ArchInfo
from studio.methods.base import ADDITIVE, EXTRA_MODULES, ApplyContext, Count, MethodSpec, n, param


@dataclass(frozen=True)
class HoulsbyParams:
    r: int = param(64, "Bottleneck width: the adapter squeezes d features down to r and back.",
                   min=1, max=4096)
    activation: str = param("gelu", "Non-linearity inside the bottleneck.", choices=("gelu", "relu"))


def houlsby_count(arch: ArchInfo, p: HoulsbyParams) -> Count:
    d, r, layers = arch.hidden_size, p.r, arch.num_layers
    per = 2 * d * r + r + d
    total = layers * 2 * per
    return Count(total, f"L × 2 × (2·d·r + r + d) = {layers} × 2 × (2×{d}×{r} + {r} + {d}) = {n(total)}")


def houlsby_tensors(arch: ArchInfo, p: HoulsbyParams) -> list[tuple[int, int]]:
    adapters = 2 * arch.num_layers  # down weight, down bias, up weight, up bias each
    d, r = arch.hidden_size, p.r
    return [(d * r, 2 * adapters), (r, adapters), (d, adapters)]


def apply_houlsby(model: Any, arch: ArchInfo, p: HoulsbyParams, ctx: ApplyContext) -> Any:
    from studio.adapters.bottleneck import add_bottleneck_adapters

    return add_bottleneck_adapters(model, arch.hidden_size, p.r, p.activation)


HOULSBY = MethodSpec(
    name="houlsby", title="Bottleneck adapters (Houlsby)", family=ADDITIVE, mergeable=False,
    inference_overhead=EXTRA_MODULES,
    guidance="The classic adapter: robust quality, independent of the attention layout, easy to "
             "stack per task. Costs a little latency at inference because it cannot merge.",
    params_cls=HoulsbyParams, count=houlsby_count, apply=apply_houlsby, tensors=houlsby_tensors,
    notes="Cannot merge: the adapter has a non-linearity between its two projections.",
    adapter_in_base_dtype=True,  # our modules are built in the dtype of the layer they follow
    # Saved as bottleneck_config.json + safetensors (not PEFT's layout): loads with the studio.
    peft_adapter=False, recognises=lambda config: config.get("method") == "houlsby",
    default_learning_rate=1e-3,
    activations=lambda arch, p, width: activations.bottleneck(arch, p.r, width),
)
SPECS = [HOULSBY]
