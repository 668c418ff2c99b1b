"""LoRA+ builds its optimizer through peft: B trains at ratio × the learning rate of A."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_llama_config
from studio.methods.base import ApplyContext
from studio.arch import ArchInfo
from studio.methods import get_method


def fresh():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_llama_config())


def test_loraplus_optimizer_gives_b_ratio_times_the_learning_rate():
    from studio.methods.lora import loraplus_optimizer

    model = fresh()
    arch = ArchInfo.from_model(model)
    spec = get_method("loraplus")
    params = spec.params()
    assert params.loraplus_lr_ratio == 16.0
    model = spec.apply(model, arch, params, ApplyContext())
    optimizer = loraplus_optimizer(model, params, lr=1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    rates = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            rates[names[id(p)]] = group["lr"]
    assert all(rate == pytest.approx(1.6e-3) for name, rate in rates.items() if "lora_B" in name)
    assert all(rate == pytest.approx(1e-4) for name, rate in rates.items() if "lora_A" in name)
    assert loraplus_optimizer(model, get_method("lora").params(), lr=1e-4) is None
