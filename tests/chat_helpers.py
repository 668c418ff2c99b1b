"""Adapters with random, non-trivial weights for the Compare tests, saved as real adapter folders.

A freshly initialised adapter is a no-op (LoRA B = 0, IA3 = 1, bottleneck up = 0), so every
column would answer like the base and a test comparing columns could not fail. These helpers
perturb the adapter weights under a seed before saving.
"""

from __future__ import annotations

from pathlib import Path

import torch

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _perturb(model, seed: int, scale: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.requires_grad:
            noise = torch.randn(param.shape, generator=generator) * scale
            with torch.no_grad():
                param.add_(noise.to(param.dtype))


def save_peft_adapter(base_dir: Path, dest: Path, method: str, seed: int, r: int = 4) -> Path:
    """Train-free adapter of ``method`` (lora, dora, rslora, ia3, prompt, prefix) over the model in
    ``base_dir``; ``r`` is the LoRA-family rank (alpha 2r)."""
    from peft import (IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType,
                      get_peft_model)

    from studio.models import load_model

    torch.manual_seed(seed)
    base = load_model(str(base_dir))
    if method in ("lora", "dora", "rslora"):
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=LORA_TARGETS, use_dora=method == "dora",
                            use_rslora=method == "rslora", task_type=TaskType.CAUSAL_LM)
    elif method == "ia3":
        config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                           feedforward_modules=["down_proj"], task_type=TaskType.CAUSAL_LM)
    elif method == "prompt":
        config = PromptTuningConfig(num_virtual_tokens=4, task_type=TaskType.CAUSAL_LM)
    elif method == "prefix":
        config = PrefixTuningConfig(num_virtual_tokens=4, task_type=TaskType.CAUSAL_LM)
    else:
        raise ValueError(method)
    model = get_peft_model(base, config)
    _perturb(model, seed, {"ia3": 0.5, "prompt": 1.0, "prefix": 1.0}.get(method, 0.3))
    model.save_pretrained(str(dest))
    return dest


def save_bottleneck_adapter(base_dir: Path, dest: Path, seed: int) -> Path:
    from studio.adapters import bottleneck
    from studio.models import load_model

    base = load_model(str(base_dir))
    model = bottleneck.add_bottleneck_adapters(base, base.config.hidden_size, r=8)
    for name, param in model.named_parameters():
        param.requires_grad_(".adapter." in name)
    _perturb(model, seed, 0.5)
    return bottleneck.save_bottleneck(model, dest)
