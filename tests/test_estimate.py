"""The memory estimate, term by term, against measurements on real models (CPU, fp32)."""

from __future__ import annotations

import copy
import gc
import time

import pytest
import torch

from conftest import CONFIGS, tiny_llama_config
from studio.methods.base import ApplyContext
from studio.arch import ArchInfo
from studio.estimate import TrainSetup, estimate_chat, estimate_training, verdict
from studio.memory_measure import saved_activation_bytes, state_bytes
from studio.methods import ORDER, get_method
from studio.methods.base import trainable_count
from studio.models import load_config

METHODS = [m for m in ORDER if m != "qlora"]  # QLoRA needs a 4-bit load: tested below
WITH_DROPOUT = {"lora", "dora", "rslora", "loraplus"}


def build(cfg, method: str, settings: dict):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    arch = ArchInfo.from_config(cfg)
    spec = get_method(method)
    params = spec.params(settings)
    model = spec.apply(AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa"), arch, params, ApplyContext())
    return arch, params, model


def cases():
    for method in METHODS:
        yield method, {}
        if method in WITH_DROPOUT:
            yield method, {"lora_dropout": 0.0}


@pytest.mark.parametrize("method,settings", list(cases()), ids=lambda v: str(v))
def test_state_bytes_exact_and_activations_within_15_percent(method, settings):
    cfg = tiny_llama_config()
    arch, params, model = build(cfg, method, settings)
    trainable = trainable_count(model)
    setup = TrainSetup(batch_size=2, seq_len=32, dtype="fp32", device="cpu", masked=False)
    est = estimate_training(arch, method, params, trainable, setup)
    assert trainable == get_method(method).count(arch, params).trainable

    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    measured = saved_activation_bytes(model, ids)
    ratio = est.saved_activation_bytes / measured
    assert 0.85 <= ratio <= 1.15, f"activations: estimate/measured = {ratio:.3f}"

    measured_state = state_bytes(model, "adamw")
    weights = est.term("weights").bytes + est.term("trainable").bytes
    assert weights == measured_state["frozen"] + measured_state["trainable"]
    # All gradients after a backward; the "gradients" term of whole-model training holds only
    # what they add to the peak (estimate._whole_model_gradients).
    assert est.gradient_bytes == measured_state["gradients"]
    if get_method(method).optimizer_state is None:  # GaLore/APOLLO: against their own, test_galore.py
        assert est.term("optimizer").bytes == measured_state["optimizer"]


@pytest.mark.parametrize("method", ["lora", "ia3", "houlsby", "prefix", "full"])
def test_adamw8bit_state_bytes_exact(method):
    pytest.importorskip("bitsandbytes")
    cfg = tiny_llama_config(hidden_size=128, intermediate_size=256)  # tensors on both sides of 4096
    arch, params, model = build(cfg, method, {})
    est = estimate_training(arch, method, params, trainable_count(model),
                            TrainSetup(2, 16, "fp32", optimizer="adamw8bit", device="cpu"))
    assert est.term("optimizer").bytes == state_bytes(model, "adamw8bit")["optimizer"]


def test_sgd_keeps_no_state_and_logits_scale_with_vocab():
    cfg = tiny_llama_config()
    arch, params, model = build(cfg, "lora", {})
    est = estimate_training(arch, "lora", params, trainable_count(model),
                            TrainSetup(2, 32, "fp32", optimizer="sgd", device="cpu"))
    assert est.term("optimizer").bytes == state_bytes(model, "sgd")["optimizer"] == 0
    # The label-only loss: one chunk (here all 64 positions) + the labelled hidden states + one
    # logits row per sequence (test_label_loss.py measures it).
    assert est.term("logits").bytes == 2 * 32 * cfg.vocab_size * (4 + 4 + 4) + 2 * 32 * cfg.hidden_size * 4 \
        + 2 * cfg.vocab_size * 4


def test_quantised_and_checkpointed_estimates_shrink_the_right_terms():
    arch = ArchInfo.from_config(load_config(str(CONFIGS / "llama3-8b.json")))
    spec = get_method("qlora")
    params = spec.params()
    trainable = spec.count(arch, params).trainable
    bf16 = estimate_training(arch, "lora", params, trainable, TrainSetup(dtype="bf16"))
    nf4 = estimate_training(arch, "qlora", params, trainable, TrainSetup(dtype="bf16", quant="nf4"))
    nf4_single = estimate_training(arch, "qlora", params, trainable,
                                   TrainSetup(dtype="bf16", quant="nf4", double_quant=False))
    ckpt = estimate_training(arch, "lora", params, trainable, TrainSetup(dtype="bf16", grad_checkpointing=True))
    # NF4: linear weights at ~4.127 bits, embeddings and head at 16.
    quantised = arch.linear_params
    expected = int(quantised * (4 + 8 / 64 + 32 / (64 * 256)) / 8) + (arch.total_params - quantised) * 2
    assert nf4.term("weights").bytes == expected
    assert nf4_single.term("weights").bytes > nf4.term("weights").bytes
    # 8B: 7.0B quantised Linear weights, 1.05B embedding + head parameters stay bf16 (~2.8x).
    assert nf4.term("weights").bytes < bf16.term("weights").bytes / 2.5
    assert ckpt.term("activations").bytes < bf16.term("activations").bytes / 3
    assert ckpt.term("logits").bytes == bf16.term("logits").bytes


def test_70b_estimate_is_fast_and_chat_counts_the_kv_cache():
    arch = ArchInfo.from_config(load_config(str(CONFIGS / "llama3-70b.json")))
    spec = get_method("lora")
    started = time.perf_counter()
    for _ in range(100):
        params = spec.params({"r": "16"})
        est = estimate_training(arch, "lora", params, spec.count(arch, params).trainable, TrainSetup())
    per_estimate = (time.perf_counter() - started) / 100
    assert est.total_bytes > arch.total_params * 2  # at least the bf16 weights
    assert per_estimate < 0.1  # generous: the figure itself goes to docs/benchmarks.md
    chat = estimate_chat(arch, TrainSetup(dtype="bf16"), context=8192)
    assert chat.term("kv_cache").bytes == 2 * 80 * 1024 * 8192 * 2


@pytest.mark.parametrize("total,free,word", [(50, 100, "fits"), (90, 100, "tight"),
                                            (120, 100, "exceeds"), (1, None, "unknown")])
def test_verdict(total, free, word):
    assert verdict(total, free) == word


@pytest.fixture(scope="module")
def smollm2_shaped():
    """A randomly initialised model of the 135M architecture, built once (the random init of
    135M parameters is most of the cost); each test applies its method to a copy."""
    from transformers import AutoModelForCausalLM

    cfg = load_config(str(CONFIGS / "smollm2-135m.json"))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    yield cfg, model
    del model
    gc.collect()


# The methods whose saved activations depend on the architecture in their own way: LoRA's
# dropout copies, DoRA's norms, the prefix keys/values under GQA, the prompt lengthening the
# sequence, our bottleneck modules, full fine-tuning. IA3 and VeRA add nothing new here; every
# method is checked on the tiny Llama above.
@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "dora", "prompt", "prefix", "houlsby", "full"])
def test_activations_on_the_135m_architecture(method, smollm2_shaped):
    cfg, base = smollm2_shaped
    arch = ArchInfo.from_config(cfg)
    spec = get_method(method)
    params = spec.params({})
    torch.manual_seed(0)
    model = spec.apply(copy.deepcopy(base), arch, params, ApplyContext())
    est = estimate_training(arch, method, params, trainable_count(model),
                            TrainSetup(batch_size=2, seq_len=64, dtype="fp32", device="cpu", masked=False))
    measured = saved_activation_bytes(model, torch.randint(0, cfg.vocab_size, (2, 64)))
    assert 0.85 <= est.saved_activation_bytes / measured <= 1.15


def test_qlora_on_cpu_sends_gradient_to_the_first_layer(tiny_llama_dir):
    """The bitsandbytes CPU trap: no inference before training, and the gradient must arrive."""
    pytest.importorskip("bitsandbytes")
    from studio.models import load_model
    from studio.methods.qlora import quantization_config

    spec = get_method("qlora")
    params = spec.params({"bnb_4bit_compute_dtype": "float32", "lora_dropout": 0.0})
    model = load_model(str(tiny_llama_dir), quantization_config=quantization_config(params))
    assert getattr(model, "is_loaded_in_4bit", False)
    arch = ArchInfo.from_model(model)
    model = spec.apply(model, arch, params, ApplyContext())
    ids = torch.randint(0, 512, (2, 16))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    first_b = next(p for n, p in model.named_parameters() if "layers.0." in n and "lora_B" in n)
    assert first_b.grad is not None and first_b.grad.abs().sum().item() > 0
