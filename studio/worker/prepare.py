"""Building what the Trainer needs from a RunSpec: device and precision, the model with its
method applied, and the tokenised train / eval data with their collator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from studio import models
from studio.arch import ArchInfo
from studio.db import Database
from studio.methods import get_method
from studio.runspec import RunSpec


@dataclass
class Compute:
    device: str  # "cuda" or "cpu"
    load_dtype: str  # dtype the weights are loaded in
    bf16: bool
    fp16: bool


def choose_compute(spec: RunSpec) -> Compute:
    """CUDA when present, else CPU; ``auto`` precision: bf16 where the GPU supports it, fp16 on
    older GPUs, fp32 on the CPU (CPU bf16 matmuls are slower than fp32 on most desktop chips)."""
    cuda = torch.cuda.is_available()
    precision = spec.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if not cuda and precision == "fp16":
        raise ValueError("fp16 training needs a GPU; use fp32 or bf16 on the CPU")
    load = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float32"}[precision]
    return Compute("cuda" if cuda else "cpu", load, precision == "bf16", precision == "fp16")


def build_model(spec: RunSpec, compute: Compute) -> tuple[Any, Any, ArchInfo, Any]:
    """(model with the method applied, tokenizer, ArchInfo, method params)."""
    method = get_method(spec.method)
    params = method.params(spec.method_settings)
    tokenizer = models.load_tokenizer(spec.model, spec.trust_remote_code)
    kwargs: dict[str, Any] = {}
    if method.quantized:
        from studio.methods.qlora import quantization_config

        kwargs["quantization_config"] = quantization_config(params)
        if compute.device == "cuda":
            kwargs["device_map"] = {"": 0}
    model = models.load_model(spec.model, dtype=compute.load_dtype,
                              device=None if method.quantized else compute.device,
                              trust_remote_code=spec.trust_remote_code, **kwargs)
    model.config.use_cache = False  # training: no KV cache (and packing needs it off)
    arch = ArchInfo.from_model(model)
    if spec.method == "prompt" and params.init_text:
        from studio.methods.prompt_learning import apply_prompt

        model = apply_prompt(model, arch, params, tokenizer_path=str(models.tokenizer_folder(spec.model)))
    else:
        model = method.apply(model, arch, params)
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
