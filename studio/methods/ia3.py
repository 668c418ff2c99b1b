"""IA3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning"): learned vectors that rescale activations elementwise.

Keys and values are scaled on their output side (one scale per output feature), the feed-forward
output projection on its input side (one per input feature), all initialised to 1:
    count = Σ_attention-targets out + Σ_feedforward-targets in
For Llama-style blocks with k_proj, v_proj and down_proj: L × (kv_dim + kv_dim + d_ff), e.g.
SmolLM2: 30 × (192 + 192 + 1536) = 57,600.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from studio import activations
from studio.arch import ArchInfo
from studio.methods.base import (ADDITIVE, SCALES, ApplyContext, Count, MethodSpec, SettingError,
                                 grouped_formula, param, peft_type_is)

KEY_VALUE_LEAVES = ("k_proj", "v_proj", "key", "value", "c_attn", "query_key_value", "qkv_proj", "Wqkv")


@dataclass(frozen=True)
class IA3Params:
    target_modules: tuple = param((), "Modules to rescale (default: keys, values and the "
                                  "feed-forward output projection).", advanced=True)
    feedforward_modules: tuple = param((), "Which targets are feed-forward (scaled on their "
                                       "input). Default: the MLP output projection.", advanced=True)


def default_targets(arch: ArchInfo) -> tuple[list[str], list[str]]:
    """Keys/values (or the fused qkv) plus the MLP's output projection (the Linear back to d)."""
    attention = [g.leaf for g in arch.block_linears if g.role == "attention" and g.leaf in KEY_VALUE_LEAVES]
    mlp_out = [g.path for g in arch.block_linears if g.role == "mlp" and g.out_features == arch.hidden_size]
    leaves = [g.leaf for g in arch.block_linears]
    # Use the bare leaf when it is unambiguous (GPT-2's c_proj is not: attn.c_proj, mlp.c_proj).
    mlp_out = [p.rsplit(".", 1)[-1] if leaves.count(p.rsplit(".", 1)[-1]) == 1 else p for p in mlp_out]
    if not attention or not mlp_out:
        raise SettingError("cannot find key/value and feed-forward output projections in this "
                           "model; set target_modules and feedforward_modules")
    return list(dict.fromkeys(attention + mlp_out)), list(dict.fromkeys(mlp_out))


def resolved(arch: ArchInfo, p: IA3Params) -> tuple[list[str], list[str]]:
    if p.target_modules:
        return list(p.target_modules), list(p.feedforward_modules)
    return default_targets(arch)


def ia3_count(arch: ArchInfo, p: IA3Params) -> Count:
    targets, feedforward = resolved(arch, p)
    ff_groups = {id(g) for g in arch.matching(feedforward)} if feedforward else set()
    groups = arch.matching(targets)
    if not groups:
        raise SettingError(f"no module matches {targets}; the model has {arch.target_leaves}")
    terms, total = [], 0
    for g in groups:
        width = g.in_features if id(g) in ff_groups else g.out_features
        total += g.count * width
        terms.append((g.count, f"{width} {g.leaf}{' in' if id(g) in ff_groups else ' out'}"))
    return Count(total, grouped_formula("Σ scales", terms, total))


def ia3_tensors(arch: ArchInfo, p: IA3Params) -> list[tuple[int, int]]:
    targets, feedforward = resolved(arch, p)
    ff = {id(g) for g in arch.matching(feedforward)} if feedforward else set()
    return [(g.in_features if id(g) in ff else g.out_features, g.count) for g in arch.matching(targets)]


def apply_ia3(model: Any, arch: ArchInfo, p: IA3Params, ctx: ApplyContext) -> Any:
    from peft import IA3Config, get_peft_model

    targets, feedforward = resolved(arch, p)
    config = IA3Config(target_modules=targets, feedforward_modules=feedforward, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


IA3 = MethodSpec(
    name="ia3", title="IA3", family=ADDITIVE, mergeable=True, inference_overhead=SCALES,
    guidance="The fewest parameters of any method here (tens of thousands): for many tasks on one "
             "base, tiny files, and few examples; usually below LoRA in quality.",
    params_cls=IA3Params, count=ia3_count, apply=apply_ia3, tensors=ia3_tensors,
    default_learning_rate=3e-3, recognises=peft_type_is("IA3"),
    activations=lambda arch, p, width: activations.scales(arch, *resolved(arch, p), width),
)
SPECS = [IA3]
