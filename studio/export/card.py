"""The model card (README.md) written into every export folder."""

from __future__ import annotations

from typing import Any

import studio


def model_card(*, run: Any, spec: Any, dataset: Any, kind: str, dtype: str, metrics: dict[str, float],
               steps: int | None, mergeable: bool) -> str:
    settings = "\n".join(f"| {k} | {v} |" for k, v in sorted(spec.method_settings.items())) or "| (defaults) | |"
    scores = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items())) or "| (none recorded) | |"
    what = ("the base model with the adapter merged into its weights; load it with "
            "`AutoModelForCausalLM.from_pretrained(folder)`" if kind == "merged" else
            "the adapter alone; load it over the base with `peft.PeftModel.from_pretrained(base, folder)`"
            if spec.method != "houlsby" else
            "the bottleneck adapters alone (PEFT Studio layout: bottleneck_config.json + "
            "adapter_model.safetensors); load with `studio.adapters.bottleneck.load_bottleneck(base, folder)`")
    dataset_line = (f"{dataset.name} (source sha256 `{dataset.source_hash}`, {dataset.num_train} train / "
                    f"{dataset.num_eval} eval examples)" if dataset is not None else "not recorded")
    return f"""---
library_name: {"transformers" if kind == "merged" else "peft"}
base_model: {spec.model}
tags: [peft-studio, {spec.method}]
---
# {run.name}

Exported by PEFT Studio {studio.__version__}: {what}.

| | |
|---|---|
| base model | {spec.model} |
| method | {spec.method}{" (cannot be merged)" if not mergeable else ""} |
| export | {kind}, {dtype} |
| dataset | {dataset_line} |
| training steps | {steps if steps is not None else "unknown"} |
| learning rate | {spec.learning_rate} ({spec.lr_scheduler}), batch {spec.batch_size} × {spec.grad_accum} |
| max length | {spec.max_length}, loss on {spec.loss_on} tokens |
| seed | {spec.seed} |

## Method settings

| setting | value |
|---|---|
{settings}

## Final metrics

| metric | value |
|---|---|
{scores}
"""
