"""Building what the Trainer needs from a RunSpec: device and precision, the model with its
method applied, and the tokenised train / eval data with their collator."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from studio import models
from studio.arch import ArchInfo
from studio.db import Database
from studio.methods import get_method
from studio.methods.base import ApplyContext
from studio.runspec import RunSpec


@dataclass
class Compute:
    device: str  # "cuda" or "cpu"
    load_dtype: str  # dtype the weights are loaded in
    bf16: bool  # the Trainer's mixed precision (autocast)
    fp16: bool
    # What was chosen and why (``precision.Decision.as_dict``), recorded with the run.
    decision: dict[str, Any] = field(default_factory=dict)


def choose_compute(spec: RunSpec) -> Compute:
    """CUDA when present, else CPU. ``auto``: bf16 where the GPU supports it, fp16 on older GPUs;
    on the CPU a bf16-stored base only when a measured bf16 training step of the model's shapes is
    clearly faster than fp32 (``precision.decide_cpu``: on many desktop CPUs it is slower).
    ``bf16`` / ``fp32`` / ``fp16`` force one.

    A bf16 run on the CPU stores the base in bf16 and runs without autocast: every matmul is
    already bf16 (the LoRA updates through ``precision.compute_adapters_in``), and autocast would
    only add accelerate's fp32 copy of the b × s × V logits; and with eager attention up to
    ``precision.EAGER_MAX_LENGTH`` tokens (SDPA's CPU flash backward is slow in bf16). On a GPU
    the Trainer's autocast stays (fp16 needs its loss scaling; bf16 as before)."""
    from studio.worker import precision as probe

    cuda = torch.cuda.is_available()
    chosen = spec.precision
    decision = probe.Decision(chosen, "set in the run's settings")
    if chosen == "auto" and cuda:
        chosen = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        decision = probe.Decision(chosen, "GPU: bf16 where supported, else fp16")
    elif chosen == "auto":
        decision = probe.decide_cpu(models.load_config(spec.model, spec.trust_remote_code))
        chosen = decision.precision
    if not cuda and chosen == "fp16":
        raise ValueError("fp16 training needs a GPU; use fp32 or bf16 on the CPU")
    load = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float32"}[chosen]
    device = "cuda" if cuda else "cpu"
    decision.attention = probe.attention_for(device, load, spec.max_length)
    return Compute(device, load, chosen == "bf16" and cuda, chosen == "fp16", decision.as_dict())


def build_model(spec: RunSpec, compute: Compute) -> tuple[Any, Any, ArchInfo, Any]:
    """(model with the method applied, tokenizer, ArchInfo, method params)."""
    method = get_method(spec.method)
    params = method.params(spec.method_settings)
    tokenizer = models.load_tokenizer(spec.model, spec.trust_remote_code)
    kwargs: dict[str, Any] = {}
    if method.quantization is not None:
        kwargs["quantization_config"] = method.quantization(params)
        if compute.device == "cuda":
            kwargs["device_map"] = {"": 0}
    if compute.decision.get("attention"):  # eager for a short bf16 step on the CPU (precision.py)
        kwargs["attn_implementation"] = compute.decision["attention"]
    model = models.load_model(spec.model, dtype=compute.load_dtype,
                              device=None if method.quantized else compute.device,
                              trust_remote_code=spec.trust_remote_code, **kwargs)
    model.config.use_cache = False  # training: no KV cache (and packing needs it off)
    arch = ArchInfo.from_model(model)
    context = ApplyContext(tokenizer=tokenizer, tokenizer_path=str(models.tokenizer_folder(spec.model)),
                           device=compute.device, dtype=compute.load_dtype)
    model = method.apply(model, arch, params, context)
    if compute.device == "cpu" and compute.load_dtype == "bfloat16":
        from studio.worker.precision import compute_adapters_in

        compute_adapters_in(model, torch.bfloat16)  # no per-layer activation casts (see there)
    if spec.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    return model, tokenizer, arch, params


def dataset_for(db: Database, spec: RunSpec, project_id: int) -> int:
    """The dataset id to train on, importing the sample task into the project when asked."""
    if spec.dataset_id is not None:
        return spec.dataset_id
    from studio.data import import_sample_task

    return import_sample_task(db, project_id, spec.sample_task).dataset.id


def build_data(db: Database, spec: RunSpec, dataset_id: int, tokenizer: Any) -> tuple[Any, Any, Any]:
    """(train features, eval features or None, collator)."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq

    from studio.data import load_dataset_split
    from studio.data.tokenize import tokenize_dataset

    def features(split: str):
        rows = load_dataset_split(db, dataset_id, split)
        if len(rows) == 0:
            return None
        tokenised = tokenize_dataset(rows, tokenizer, max_length=spec.max_length, loss_on=spec.loss_on)
        return tokenised.remove_columns([c for c in tokenised.column_names
                                         if c not in ("input_ids", "labels", "attention_mask")])

    train, evaluation = features("train"), features("eval")
    if train is None or len(train) == 0:
        raise ValueError("the training split has no usable rows (all empty or without answer tokens)")
    if spec.packing:
        from studio.data.packing import PackedCollator, pack_examples

        def packed(split_features):
            if split_features is None:
                return None
            packs = pack_examples(list(split_features), spec.max_length)
            return Dataset.from_list([{k: p[k] for k in ("input_ids", "labels", "position_ids")} for p in packs])

        return packed(train), packed(evaluation), PackedCollator(pad_token_id=tokenizer.pad_token_id)
    # Pads input_ids with the pad token, attention_mask with 0 and labels with -100.
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    return train, evaluation, collator
