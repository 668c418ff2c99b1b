"""Building what the Trainer needs from a RunSpec: device and precision, the model with its
method applied, and the tokenised train / eval data with their collator; ``decide``: what rank 0
chooses for every rank of a multi-process run before any of them loads (``ranks.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from studio import models
from studio.arch import ArchInfo
from studio.db import Database
from studio.distributed import strategy
from studio.methods import get_method
from studio.methods.base import ApplyContext
from studio.run_setup import DeviceFacts, training_setup
from studio.runspec import RunSpec
from studio.worker import kernels, ranks


@dataclass
class Compute:
    device: str  # "cuda" or "cpu"
    load_dtype: str  # dtype the weights are loaded in
    bf16: bool  # the Trainer's mixed precision (autocast)
    fp16: bool
    # What was chosen and why (``precision.Decision.as_dict``), recorded with the run.
    decision: dict[str, Any] = field(default_factory=dict)
    facts: DeviceFacts | None = None  # the device as the run started (free memory before loading)


def device_now() -> DeviceFacts:
    """This process's device as ``run_setup`` describes devices (the CPU probe not yet asked)."""
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return DeviceFacts("cuda", int(free), torch.cuda.is_bf16_supported(), None, int(total))
    from studio.sysinfo import available_ram_bytes

    return DeviceFacts("cpu", None, False, None, ram_available_bytes=available_ram_bytes())  # the OOM advice's budget


def choose_compute(spec: RunSpec) -> Compute:
    """CUDA when present, else CPU; the precision is ``run_setup.training_setup``'s, the rule the
    estimates use too. ``auto`` on the CPU measures first when it was never measured: a bf16-stored
    base only when a bf16 training step of the model's shapes is clearly faster than fp32
    (``precision.decide_cpu``: on many desktop CPUs it is slower).

    A bf16 run on the CPU stores the base in bf16 and runs without autocast: every matmul is
    already bf16 (the LoRA updates through ``precision.compute_adapters_in``), and autocast would
    only add accelerate's fp32 copy of the b × s × V logits; and with eager attention up to
    ``precision.EAGER_MAX_LENGTH`` tokens (SDPA's CPU flash backward is slow in bf16). On a GPU
    the Trainer's autocast stays (fp16 needs its loss scaling, over fp32 weights; bf16 as before)."""
    from studio.worker import precision as probe

    device = device_now()
    measured = None
    if device.kind == "cpu" and spec.precision == "auto":
        measured = probe.decide_cpu(models.load_config(spec.model, spec.trust_remote_code),
                                    spec.trust_remote_code)
        device = replace(device, cpu_bf16=measured.precision == "bf16")
    choice = training_setup(spec, device)  # SetupError: fp16 or liger_kernel without a GPU
    decision = measured or probe.Decision(choice.precision, choice.reason)
    chosen, cuda = choice.precision, device.kind == "cuda"
    load = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float32"}[chosen]
    decision.attention = probe.attention_for(device.kind, load, spec.max_length)
    return Compute(device.kind, load, chosen == "bf16" and cuda, chosen == "fp16", decision.as_dict(), device)


def decide(db: Database, run_id: int, spec: RunSpec, folder: Path, resume: bool) -> tuple:
    """Rank 0's choices for every rank (``ranks.share``): (compute, dataset id, the checkpoint
    to resume from or None). Writes precision.json and, for a sample task, its dataset."""
    from studio.worker.precision_record import record
    from studio.worker.resilient import Patient

    compute = choose_compute(spec)
    record(folder, compute.decision)  # what precision and why: the Train tab shows it
    run = db.get_run(run_id)
    patient = Patient(db)  # importing the sample task writes rows: it may meet a lock too
    dataset_id = dataset_for(patient, spec, run.project_id)
    if run.dataset_id != dataset_id:
        patient.update_run(run_id, dataset_id=dataset_id)
    if ranks.distributed():  # converted or downloaded once, before every rank loads it
        models.resolve_source(spec.model)
    checkpoint = None
    if resume:
        latest = db.latest_checkpoint(run_id)
        checkpoint = latest.path if latest is not None and Path(latest.path).is_dir() else None
    return compute, dataset_id, checkpoint


def build_model(spec: RunSpec, compute: Compute) -> tuple[Any, Any, ArchInfo, Any]:
    """(model with the method applied, tokenizer, ArchInfo, method params)."""
    method = get_method(spec.method)
    params = method.params(spec.method_settings)
    tokenizer = models.load_tokenizer(spec.model, spec.trust_remote_code)
    kwargs: dict[str, Any] = {}
    sharded = strategy.flattens_parameters(spec, ranks.world_size())
    if method.quantization is not None:
        kwargs["quantization_config"] = quantization = method.quantization(params)
        if sharded and hasattr(quantization, "bnb_4bit_quant_storage"):
            # FSDP / ZeRO-3 flatten a unit's parameters into one tensor of one dtype: the packed
            # 4-bit weights are stored in the load dtype the rest of the model has (PEFT's FSDP
            # and DeepSpeed QLoRA guides), not uint8.
            quantization.bnb_4bit_quant_storage = getattr(torch, compute.load_dtype)
        if compute.device == "cuda":
            kwargs["device_map"] = {"": ranks.local_rank()}
    if compute.decision.get("attention"):  # eager for a short bf16 step on the CPU (precision.py)
        kwargs["attn_implementation"] = compute.decision["attention"]
    if spec.liger_kernel:  # refused before minutes of loading when it cannot be had
        kernels.liger_patcher(models.load_config(spec.model, spec.trust_remote_code).model_type, compute.device)
    model = models.load_model(spec.model, dtype=compute.load_dtype,
                              device=None if method.quantized else compute.device,
                              trust_remote_code=spec.trust_remote_code, **kwargs)
    model.config.use_cache = False  # training: no KV cache (and packing needs it off)
    if spec.liger_kernel:  # patched before the method wraps the projections the kernels call
        print(kernels.apply_liger(model, compute.device), flush=True)
    arch = ArchInfo.from_model(model)
    context = ApplyContext(tokenizer=tokenizer, tokenizer_path=str(models.tokenizer_folder(spec.model)),
                           device=compute.device, dtype=compute.load_dtype, sharded=sharded)
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
