"""The seeds' worked examples (d=4096, L=32, d_ff=11008, MHA: the Llama-2-7B shape) and the
parameter plumbing every method shares (settings parsing, bounds, formulas as shown)."""

from __future__ import annotations

import dataclasses

import pytest

from conftest import CONFIGS
from studio.arch import ArchInfo
from studio.methods import ORDER, all_methods, get_method
from studio.methods.base import SettingError
from studio.models import load_config

LLAMA2 = ArchInfo.from_config(load_config(str(CONFIGS / "llama2-7b.json")))


def count(method: str, **settings) -> int:
    spec = get_method(method)
    return spec.count(LLAMA2, spec.params(settings)).trainable


def test_seed_examples_reproduce():
    assert (LLAMA2.hidden_size, LLAMA2.num_layers, LLAMA2.intermediate_size) == (4096, 32, 11008)
    assert count("ia3") == 614_400  # 32 × (4096 + 4096 + 11008)
    assert count("prompt", num_virtual_tokens=20) == 81_920
    assert count("prefix", num_virtual_tokens=20) == 5_242_880
    # Seeds: "Houlsby r=64 ≈ 33.6M" counts the two weight matrices (2·d·r per adapter); our
    # adapters also have biases (r + d each), which adds 0.7 %.
    houlsby = count("houlsby", r=64)
    assert houlsby == 32 * 2 * (2 * 4096 * 64 + 64 + 4096) == 33_820_672
    assert abs(houlsby - 33.6e6) / 33.6e6 < 0.01


def test_dora_adds_one_magnitude_per_output_feature():
    for preset in ("attention", "all-linear"):
        lora = count("lora", r=8, target_preset=preset)
        dora = count("dora", r=8, target_preset=preset)
        outs = sum(g.count * g.out_features for g in LLAMA2.block_linears
                   if preset == "all-linear" or g.role == "attention")
        assert dora - lora == outs


def test_rank_scale_switches_do_not_change_the_count():
    assert count("rslora", r=16, lora_alpha=32) == count("lora", r=16) == count("loraplus", r=16)
    assert count("qlora", r=16) == count("lora", r=16)


def test_ia3_formula_reads_like_the_seeds():
    spec = get_method("ia3")
    text = spec.count(LLAMA2, spec.params()).formula
    assert text == "Σ scales = 32 × (4096 k_proj out + 4096 v_proj out + 11008 down_proj in) = 614,400"


def test_settings_are_parsed_and_bounded():
    spec = get_method("lora")
    params = spec.params({"r": "8", "lora_alpha": "16", "target_modules": "q_proj, v_proj",
                          "use_dora": "true"})
    assert (params.r, params.lora_alpha, params.target_modules, params.use_dora) == (
        8, 16, ("q_proj", "v_proj"), True)
    assert count("lora", target_modules="q_proj,v_proj", r=8) == 32 * 8 * (8192 + 8192)
    with pytest.raises(SettingError, match="has no setting 'rank'"):
        spec.params({"rank": 8})
    with pytest.raises(SettingError, match="at least 1"):
        spec.params({"r": 0})
    with pytest.raises(SettingError, match="expects int"):
        spec.params({"r": "eight"})
    with pytest.raises(SettingError, match="one of"):
        spec.params({"target_preset": "everything"})
    with pytest.raises(SettingError, match="no module of this model matches"):
        count("lora", target_modules="c_attn")


def test_unknown_and_unavailable_methods_explain_themselves(monkeypatch):
    from studio import methods

    with pytest.raises(SettingError, match="choose one of"):
        get_method("lora2")
    # A method known but not offered says why, and its name stays reserved (GaLore was one
    # until issue 17).
    monkeypatch.setitem(methods.UNAVAILABLE, "sparse_ft", "not offered: no maintained package")
    with pytest.raises(SettingError, match="no maintained package"):
        get_method("sparse_ft")
    with pytest.raises(ValueError, match="reserved"):
        methods.register(dataclasses.replace(get_method("lora"), name="sparse_ft"))


@pytest.mark.parametrize("spec", all_methods(), ids=ORDER)
def test_every_method_declares_what_the_ui_needs(spec):
    assert spec.family in ("additive", "reparameterisation", "selective")
    assert spec.guidance and spec.inference_overhead and spec.title
    for field in spec.fields():
        assert field.metadata.get("help"), f"{spec.name}.{field.name} has no help text"
    if not spec.mergeable:
        assert "Cannot merge" in spec.notes
