"""A fine-tuning method defined outside the studio, for tests/test_toy_method.py: LoRA on the
query projection only, with its own count, tensors, apply and estimate hook. It touches no studio
file: registering it (``studio.methods.register``) is all the studio needs to count it,
estimate it, plan it and train it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from studio import activations
from studio.arch import ArchInfo
from studio.methods.base import (NO_OVERHEAD, REPARAMETERISATION, ApplyContext, Count, MethodSpec, param,
                                 per_module_sum, per_module_tensors)

TARGETS = ["q_proj"]


@dataclass(frozen=True)
class ToyParams:
    r: int = param(4, "Rank of the query projection's update.", min=1, max=64)


def count(arch: ArchInfo, p: ToyParams) -> Count:
    return per_module_sum(arch, TARGETS, lambda g: p.r * (g.in_features + g.out_features),
                          lambda g: f"{p.r} × ({g.in_features} + {g.out_features})", "Σ r × (in + out)")


def tensors(arch: ArchInfo, p: ToyParams) -> list[tuple[int, int]]:
    return per_module_tensors(arch, TARGETS, lambda g: [p.r * g.in_features, g.out_features * p.r])


def apply(model: Any, arch: ArchInfo, p: ToyParams, ctx: ApplyContext) -> Any:
    from peft import LoraConfig, get_peft_model

    assert ctx.tokenizer is not None and ctx.device == "cpu"  # the worker passes its context
    return get_peft_model(model, LoraConfig(r=p.r, lora_alpha=2 * p.r, lora_dropout=0.0,
                                            target_modules=TARGETS, task_type="CAUSAL_LM"))


TOY = MethodSpec(
    name="toy_q", title="Toy query-only LoRA", family=REPARAMETERISATION, mergeable=True,
    inference_overhead=NO_OVERHEAD, guidance="A test method.", params_cls=ToyParams,
    count=count, apply=apply, tensors=tensors, default_learning_rate=5e-2,
    activations=lambda arch, p, width: activations.low_rank(arch, TARGETS, p.r, width),
)
SPECS = [TOY]
