"""QLoRA (Dettmers et al. 2023): LoRA (or DoRA / rsLoRA / LoRA+) over a frozen 4-bit NF4 base.

Same trainable count as the LoRA it wraps. What changes is the base's memory: NF4 stores 4 bits
per weight plus one absmax per 64-weight block (with double quantisation the absmax values are
themselves 8-bit, ~0.127 extra bits per weight; without, 32/64 = 0.5 bits). Embeddings, lm_head
and norms stay in the compute dtype (see estimate.py).

Trap (see shared notes): on CPU, bitsandbytes repacks 4-bit weights for a fast inference kernel
the first time a no-grad forward runs in eval mode, and that kernel has no autograd: training
afterwards silently sends no gradient through the frozen layers. The worker never runs inference
on the 4-bit model before training; tests check a gradient reaches the first layer's adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from studio.arch import ArchInfo
from studio.methods.base import NO_OVERHEAD, REPARAMETERISATION, Advice, ApplyContext, MethodSpec, param
from studio.methods.lora import (LoraParams, apply_lora, lora_activations, lora_count, lora_tensors,
                                 loraplus_optimizer)


@dataclass(frozen=True)
class QLoraParams(LoraParams):
    bnb_4bit_quant_type: str = param("nf4", "4-bit data type: NF4 (normal-float, the QLoRA "
                                     "default) or FP4.", choices=("nf4", "fp4"))
    bnb_4bit_use_double_quant: bool = param(True, "Quantise the quantisation constants too "
                                            "(saves ~0.37 bits per weight).")
    bnb_4bit_compute_dtype: str = param("bfloat16", "Precision the 4-bit weights are expanded "
                                        "to for each matmul.", choices=("bfloat16", "float16", "float32"))


def quantization_config(p: QLoraParams):
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=p.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=p.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=getattr(torch, p.bnb_4bit_compute_dtype),
    )


def apply_qlora(model: Any, arch: ArchInfo, p: QLoraParams, ctx: ApplyContext) -> Any:
    """LoRA on a model already loaded with ``quantization_config(p)``."""
    from peft import prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) and not ctx.sharded:
        # Freezes the base, casts the few non-quantised parameters (norms) to fp32 for stable
        # training and makes the input embeddings' output require grad. Checkpointing is the
        # trainer's choice, not forced here. Not when FSDP / ZeRO-3 will shard the model: they
        # flatten each unit's parameters into one tensor of one dtype (the load dtype, which the
        # 4-bit weights are then stored in too), so no fp32 casts (as TRL does for sharded QLoRA);
        # PEFT's LoRA freezes the base itself.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return apply_lora(model, arch, p, ctx)


QLORA = MethodSpec(
    name="qlora", title="QLoRA", family=REPARAMETERISATION, mergeable=True,
    inference_overhead=NO_OVERHEAD,
    guidance="When the model does not fit in GPU memory for LoRA: the frozen base in 4-bit uses "
             "about a quarter of the memory, at some speed cost. Merging goes into a de-quantised "
             "base.",
    params_cls=QLoraParams, count=lora_count, apply=apply_qlora, quantization=quantization_config,
    tensors=lora_tensors, optimizer=loraplus_optimizer, activations=lora_activations,
    advice=Advice(large_data=True), composable=True,
)
SPECS = [QLORA]
