"""The model card (README.md) written into every export folder (for a GGUF export, with how to
run it in Ollama), and the portable name of the base model that the card and an adapter's
config carry.

An export folder gets shared, so nothing in it may point into this machine: the base model is
named by its hub id when there is one (the embedded model is SmolLM2-135M-Instruct from the
hub), otherwise by the local folder's or file's name only, never an absolute path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import studio
from studio import models

EMBEDDED_HUB_ID = f"HuggingFaceTB/{models.EMBEDDED_NAME}"  # where the embedded GGUF's model lives


def base_model_reference(source: str) -> tuple[str, bool]:
    """(a portable name for the model source ``source``, whether it is a hub id)."""
    try:
        parsed = models.parse_source(source)
    except models.ModelSourceError:
        return Path(str(source)).name or str(source), False
    if parsed.kind == "default":
        return EMBEDDED_HUB_ID, True
    if parsed.kind == "hub":
        return parsed.ref, True
    return Path(parsed.ref).name, False  # a local folder or .gguf file: its name, not where it is


def ollama_section(run_name: str, modelfile: str | None) -> str:
    """The GGUF card's "Run it with Ollama" section: the two commands (the model name derived
    from the run's name), then what the Modelfile carries, read back from ``modelfile`` (its
    text), or what the user must do when it has no TEMPLATE."""
    from studio.export.modelfile import FILENAME, ollama_name, parse_modelfile

    name = ollama_name(run_name)
    commands = f"```\nollama create {name} -f {FILENAME}\nollama run {name}\n```"
    if modelfile is None:
        return (f"## Run it with Ollama\n\nIn this folder:\n\n{commands}\n\nThe `{FILENAME}` beside the "
                "GGUF carries its chat template, stop strings and system prompt.\n")
    parsed = parse_modelfile(modelfile)
    stops = [value for key, value in parsed["parameters"] if key == "stop"]
    settings = ", ".join(f"{key} {value}" for key, value in parsed["parameters"] if key != "stop")
    lines = [f"- `FROM {parsed['from']}`: the GGUF file of this folder"]
    if parsed["template"] is not None:
        lines.append("- `TEMPLATE`: the model's chat template in Ollama's syntax, checked to build the same "
                     "prompts as the Hugging Face template")
    else:
        why = " ".join(c for c in parsed["comments"] if not c.startswith(("Ollama Modelfile", "Create and run")))
        lines.append(f"- **no `TEMPLATE`**: {why.removeprefix('No TEMPLATE: ')}")
    if parsed["system"] is not None:
        origin = next((c.removeprefix("SYSTEM is ").rstrip(".") for c in parsed["comments"]
                       if c.startswith("SYSTEM is ")), "the system prompt")
        lines.append(f"- `SYSTEM`: {origin}, below; used when a conversation brings no system message")
    lines.append(f"- `PARAMETER stop`: {', '.join(f'`{s}`' for s in stops) or 'none found'}, where "
                 "generation ends")
    if settings:
        lines.append(f"- `PARAMETER`: {settings}")
    system = f"\n````text\n{parsed['system']}\n````\n" if parsed["system"] is not None else ""
    return (f"## Run it with Ollama\n\nIn this folder:\n\n{commands}\n\nThe `{FILENAME}` holds:\n\n"
            + "\n".join(lines) + "\n" + system)


def model_card(*, run: Any, spec: Any, dataset: Any, kind: str, dtype: str, metrics: dict[str, float],
               steps: int | None, mergeable: bool, peft_adapter: bool, checkpoint: int | None = None,
               modelfile: str | None = None) -> str:
    """``peft_adapter``: the adapter folder is PEFT's (else the studio's bottleneck layout);
    ``checkpoint``: the step of the checkpoint exported (None: the run's final weights);
    ``modelfile``: the text of the GGUF export's Ollama Modelfile, described in the card."""
    settings = "\n".join(f"| {k} | {v} |" for k, v in sorted(spec.method_settings.items())) or "| (defaults) | |"
    scores = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items())) or "| (none recorded) | |"
    what = ("the base model with the adapter merged into its weights; load it with "
            "`AutoModelForCausalLM.from_pretrained(folder)`" if kind == "merged" else
            "the base model with the adapter merged, as one GGUF file for llama.cpp and Ollama"
            if kind == "gguf" else
            "the adapter alone; load it over the base with `peft.PeftModel.from_pretrained(base, folder)`"
            if peft_adapter else
            "the bottleneck adapters alone (PEFT Studio layout: bottleneck_config.json + "
            "adapter_model.safetensors); load with `studio.adapters.bottleneck.load_bottleneck(base, folder)`")
    dataset_line = (f"{dataset.name} (source sha256 `{dataset.source_hash}`, {dataset.num_train} train / "
                    f"{dataset.num_eval} eval examples)" if dataset is not None else "not recorded")
    base, on_hub = base_model_reference(spec.model)
    header = f"base_model: {base}\n" if on_hub else ""  # the hub links base_model: only a hub id
    base_line = base if on_hub else f"{base} (a local model, not on the Hugging Face hub)"
    weights = f"checkpoint at step {checkpoint}" if checkpoint is not None else "final"
    training = (f"| training steps | {steps if steps is not None else 'unknown'} |\n"
                f"| learning rate | {spec.learning_rate} ({spec.lr_scheduler}), batch {spec.batch_size} × "
                f"{spec.grad_accum} |\n| max length | {spec.max_length}, loss on {spec.loss_on} tokens |\n"
                f"| seed | {spec.seed} |")
    if getattr(run, "recipe", None):  # a composed adapter (studio.adapters.compose): never trained
        from studio.adapters.compose import CompositionError, Recipe

        try:
            made = Recipe.from_dict(run.recipe).describe()
        except CompositionError:
            made = "trained adapters"
        training = (f"| composed | {made}, with PEFT's add_weighted_adapter; not trained itself "
                    "(the method settings below are its first parent's) |")
    ollama = "\n" + ollama_section(run.name, modelfile) if kind == "gguf" else ""
    return f"""---
library_name: {"transformers" if kind == "merged" else "gguf" if kind == "gguf" else "peft"}
{header}tags: [peft-studio, {spec.method}]
---
# {run.name}

Exported by PEFT Studio {studio.__version__}: {what}.

| | |
|---|---|
| base model | {base_line} |
| method | {spec.method}{" (cannot be merged)" if not mergeable else ""} |
| export | {kind}, {dtype}, {weights} weights |
| dataset | {dataset_line} |
{training}

## Method settings

| setting | value |
|---|---|
{settings}

## Final metrics

| metric | value |
|---|---|
{scores}
{ollama}"""
