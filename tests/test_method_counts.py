"""Closed-form trainable counts equal the count of the model really built, for every method.

Every registered method × architecture families (7B and 70B configs included) × two settings:
the formula's number must equal the parameters with ``requires_grad`` of the model that PEFT (or
our bottleneck module) builds on the meta device. 0 mismatches allowed.
"""

from __future__ import annotations

import functools
from collections import Counter

import pytest
import torch

from conftest import CONFIGS
from studio.methods.base import ApplyContext
from studio.arch import ArchInfo, build_on_meta
from studio.methods import ORDER, get_method
from studio.methods.base import SettingError, trainable_count
from studio.models import load_config

FAMILIES = ["smollm2-135m", "llama2-7b", "llama3-70b", "qwen2-0.5b", "gpt2", "pythia-160m", "gemma-2b"]

# Two settings per method: its defaults and a second, different one.
SECOND = {
    "lora": {"r": 8, "target_preset": "attention"},
    "dora": {"r": 4, "target_preset": "mlp"},
    "rslora": {"r": 32},
    "loraplus": {"r": 8, "target_preset": "attention"},
    "qlora": {"r": 4, "target_preset": "attention"},
    "houlsby": {"r": 16, "activation": "relu"},
    "prefix": {"num_virtual_tokens": 10, "prefix_projection": True},
    "prompt": {"num_virtual_tokens": 5},
    "llama_adapter": {"adapter_len": 4, "adapter_layers": 2},
    "ia3": {"target_modules": "v_proj,c_attn,query_key_value"},
    "adalora": {"init_r": 4, "target_preset": "attention"},
    "loha": {"r": 4, "target_preset": "mlp"},
    "lokr": {"r": 2, "target_preset": "attention"},
    "vera": {"r": 64, "target_preset": "attention"},
    "oft": {"r": 8, "block_share": True, "target_preset": "attention"},
    "boft": {"boft_block_num": 8, "boft_n_butterfly_factor": 2, "boft_dropout": 0.1},
    "full": {},
    "last_n": {"num_layers": 1},
    "galore": {"rank": 16, "target_preset": "attention", "variant": "adafactor"},
    "apollo": {"rank": 1, "scale_type": "tensor", "layerwise": True},
}


@functools.lru_cache(maxsize=None)
def family(name: str) -> tuple:
    cfg = load_config(str(CONFIGS / f"{name}.json"))
    return cfg, ArchInfo.from_config(cfg)


def built(cfg, arch, spec, params):
    with torch.device("meta"):
        return spec.apply(build_on_meta(cfg), arch, params, ApplyContext())


def built_count(cfg, arch, spec, params) -> int:
    return trainable_count(built(cfg, arch, spec, params))


def tensor_sizes(pairs) -> Counter:
    sizes: Counter = Counter()
    for numel, count in pairs:
        sizes[numel] += count
    return sizes


CASES = [(m, f, s) for m in ORDER for f in FAMILIES for s in ("default", "second")]


@pytest.mark.parametrize("method,family_name,setting", CASES)
def test_formula_equals_built_model(method, family_name, setting):
    spec = get_method(method)
    cfg, arch = family(family_name)
    settings = {} if setting == "default" else dict(SECOND[method])
    if method == "ia3" and setting == "second":
        # Keys/values only (no feed-forward): scale the value-like projection of this family.
        present = [t for t in settings["target_modules"].split(",") if t in arch.target_leaves]
        settings = {"target_modules": ",".join(present)}
    params = spec.params(settings)
    try:
        formula = spec.count(arch, params)
    except SettingError as refused:
        # The formula refuses only what PEFT cannot build either (e.g. LoHa on GPT-2's Conv1D).
        assert str(refused)
        with pytest.raises(Exception):
            built_count(cfg, arch, spec, params)
        return
    model = built(cfg, arch, spec, params)
    assert formula.trainable == trainable_count(model), formula.formula
    assert f"{formula.trainable:,}" in formula.formula
    # The declared trainable tensors (what an optimizer keeps state for) match one for one.
    real = Counter(p.numel() for p in model.parameters() if p.requires_grad)
    assert tensor_sizes(spec.tensors(arch, params)) == real
