"""Baselines that adapt no new modules: full fine-tuning and training only the last N blocks.

* Full fine-tuning: every parameter trains; count = total parameters (tied embeddings once).
* Last N layers: only the last N decoder blocks train; count = Σ parameters of those blocks.
Both are *selective* methods in the taxonomy of Lialin et al. 2023 ("Scaling Down to Scale Up").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from studio.arch import ArchInfo
from studio.methods.base import (NO_OVERHEAD, SELECTIVE, Advice, ApplyContext, Count, MethodSpec, SettingError,
                                 n, param)


@dataclass(frozen=True)
class FullParams:
    pass


@dataclass(frozen=True)
class LastNParams:
    num_layers: int = param(2, "How many of the last decoder blocks to train.", min=1, max=1000)


def full_count(arch: ArchInfo, p: FullParams) -> Count:
    return Count(arch.total_params, f"all parameters = {n(arch.total_params)}")


def last_n_count(arch: ArchInfo, p: LastNParams) -> Count:
    if p.num_layers > arch.num_layers:
        raise SettingError(f"last_n: the model has {arch.num_layers} blocks, not {p.num_layers}")
    blocks = arch.block_params[-p.num_layers:]
    total = sum(blocks)
    if len(set(blocks)) == 1:
        text = f"N × block = {p.num_layers} × {n(blocks[0])} = {n(total)}"
    else:
        text = f"Σ last {p.num_layers} blocks = {' + '.join(n(b) for b in blocks)} = {n(total)}"
    return Count(total, text)


def full_tensors(arch: ArchInfo, p: FullParams) -> list[tuple[int, int]]:
    return list(arch.param_tensors)


def last_n_tensors(arch: ArchInfo, p: LastNParams) -> list[tuple[int, int]]:
    # Blocks share one layout; the last block's tensor sizes, N times.
    return [(numel, count * p.num_layers) for numel, count in arch.block_tensors]


def apply_full(model: Any, arch: ArchInfo, p: FullParams, ctx: ApplyContext) -> Any:
    for param_ in model.parameters():
        param_.requires_grad_(True)
    return model


def decoder_blocks(model: Any, num_layers: int) -> Any:
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            return module
    raise SettingError("could not find the model's list of decoder blocks")


def apply_last_n(model: Any, arch: ArchInfo, p: LastNParams, ctx: ApplyContext) -> Any:
    for param_ in model.parameters():
        param_.requires_grad_(False)
    for block in list(decoder_blocks(model, arch.num_layers))[-p.num_layers:]:
        for param_ in block.parameters():
            param_.requires_grad_(True)
    return model


FULL = MethodSpec(
    name="full", title="Full fine-tuning", family=SELECTIVE, mergeable=True,
    inference_overhead=NO_OVERHEAD,
    guidance="The quality reference: every weight trains. Needs ~4× the model's memory for AdamW "
             "states and gradients, and saves a whole model per task.",
    params_cls=FullParams, count=full_count, apply=apply_full, tensors=full_tensors,
    notes="Nothing to merge: the result is a whole model.",
    whole_model=True, input_trains=True, trains_output_layer=True, default_learning_rate=2e-5,
    advice=Advice(4, "the quality reference", quality_needs_fit=True, large_data=True),
)
LAST_N = MethodSpec(
    name="last_n", title="Last N layers", family=SELECTIVE, mergeable=True,
    inference_overhead=NO_OVERHEAD,
    guidance="A cheap baseline: train only the top blocks. Less memory for gradients and optimizer "
             "states; usually below LoRA for the same budget.",
    params_cls=LastNParams, count=last_n_count, apply=apply_last_n, tensors=last_n_tensors,
    notes="Nothing to merge: the trained blocks replace the base's.",
    whole_model=True, trained_blocks=lambda arch, p: p.num_layers, default_learning_rate=1e-4,
)
SPECS = [FULL, LAST_N]
