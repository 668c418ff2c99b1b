"""Our Houlsby bottleneck adapters: identity at start, trainable, saved and reloaded exactly."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_llama_config
from studio.methods.base import ApplyContext
from studio.adapters.bottleneck import (CONFIG_NAME, WEIGHTS_NAME, is_bottleneck_folder, load_bottleneck,
                                        output_projections, save_bottleneck, set_enabled)
from studio.arch import ArchInfo
from studio.methods import get_method


def fresh():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_llama_config())


def test_adapters_start_as_identity_then_train_and_round_trip(tmp_path):
    base = fresh()
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        before = base(input_ids=ids).logits
    model = fresh()
    arch = ArchInfo.from_model(model)
    spec = get_method("houlsby")
    params = spec.params({"r": 8})
    model = spec.apply(model, arch, params, ApplyContext())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)  # up-projection starts at zero

    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == spec.count(arch, params).trainable
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        set_enabled(model, False)
        assert torch.equal(model(input_ids=ids).logits, before)  # switched off = the base
        set_enabled(model, True)
    assert not torch.allclose(trained, before)

    folder = save_bottleneck(model, tmp_path / "adapter")
    assert (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file() and is_bottleneck_folder(folder)
    reloaded = load_bottleneck(fresh(), folder)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, trained)


def test_adapters_sit_on_the_sublayer_outputs():
    names = output_projections(fresh(), 64)
    assert names == ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj",
                     "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"]

