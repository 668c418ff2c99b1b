"""The memory estimate's GPU terms: bf16 training state, activations by dtype, and published peaks.

What a GPU run holds differs from an fp32 CPU run in three ways the estimate once missed:
whole-model training keeps bf16 weights, gradients and AdamW states (no fp32 master copy); in
bf16 much of what autograd saves is still fp32 (norm inputs, log-sum-exp, adapter inputs); and a
masked batch makes SDPA keep k and v repeated to every query head. Each is measured here on a
tiny Llama, then the whole estimate is held to the PEFT method comparison's measured peaks.
"""

from __future__ import annotations

import pytest
import torch

from conftest import CONFIGS, tiny_llama_config
from studio.methods.base import ApplyContext
from studio.arch import ArchInfo
from studio.estimate import TrainSetup, estimate_training
from studio.memory_measure import padding_mask, saved_activation_bytes, state_bytes
from studio.methods import get_method
from studio.methods.base import trainable_count
from studio.models import load_config
from studio.planner import plan

OURS = ["full", "last_n", "prompt", "prefix", "ia3"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def tiny():
    # A small vocabulary so that the layers, not the log-softmax, dominate what is saved; three
    # layers so that last_n (two) leaves one frozen block below the trained ones.
    return tiny_llama_config(vocab_size=64, num_hidden_layers=3)


def build(method: str, dtype: str):
    from transformers import AutoModelForCausalLM

    cfg = tiny()
    torch.manual_seed(0)
    arch = ArchInfo.from_config(cfg)
    spec = get_method(method)
    params = spec.params({})
    base = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=DTYPES[dtype])
    return cfg, arch, params, spec.apply(base, arch, params, ApplyContext())


@pytest.mark.parametrize("method", OURS + ["lora", "houlsby"])
def test_bf16_training_state_is_exact(method):
    """Weights, every gradient and the AdamW states of a bf16 model, byte for byte. The old terms
    counted whole-model training at 4 + 4 + 8 B per value (an fp32 master copy that neither
    Trainer nor torch keeps) and our bottleneck adapters at fp32 (they take the base's dtype)."""
    cfg, arch, params, model = build(method, "bf16")
    est = estimate_training(arch, method, params, trainable_count(model),
                            TrainSetup(2, 32, "bf16", device="cpu"))
    measured = state_bytes(model, "adamw")
    weights = est.term("weights").bytes + est.term("trainable").bytes
    assert weights == measured["frozen"] + measured["trainable"]
    assert est.gradient_bytes == measured["gradients"]
    assert est.term("optimizer").bytes == measured["optimizer"]


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "padded"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("method", OURS + ["dora"])
def test_saved_activations_within_5_percent(method, dtype, masked):
    """What autograd holds after the forward (saved_tensors_hooks) against the estimate, for the
    methods whose rules were wrong in bf16: prompt, prefix, IA3 (15-17 % low at 3B) and the
    whole-model ones; DoRA with dropout, which keeps an fp32 copy of each adapted weight under a
    bf16 base; on a padded batch the estimate must include k and v repeated to every head and
    the additive mask SDPA keeps per layer."""
    cfg, arch, params, model = build(method, dtype)
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    est = estimate_training(arch, method, params, trainable_count(model),
                            TrainSetup(2, 32, dtype, device="cpu", masked=masked))
    measured = saved_activation_bytes(model, ids, padding_mask(2, 32) if masked else None)
    assert 0.95 <= est.saved_activation_bytes / measured <= 1.05, \
        f"estimate / measured = {est.saved_activation_bytes / measured:.3f}"


def test_padded_batches_cost_more_than_unpadded_ones():
    """Under GQA a mask makes SDPA keep k and v at every query head's width: on Llama-3.2-3B
    (24 heads, 8 KV heads) 2 × (3072 − 1024) more values per token and layer."""
    arch = ArchInfo.from_config(load_config(str(CONFIGS / "llama3.2-3b.json")))
    spec = get_method("lora")
    params = spec.params({})
    count = spec.count(arch, params).trainable
    padded = estimate_training(arch, "lora", params, count, TrainSetup(4, 512, "bf16"))
    plain = estimate_training(arch, "lora", params, count, TrainSetup(4, 512, "bf16", masked=False))
    one = estimate_training(arch, "lora", params, count, TrainSetup(1, 512, "bf16"))
    extra = padded.term("activations").bytes - plain.term("activations").bytes
    per_layer = 2 * (3072 - 1024) * 4 * 512 * 2 + 4 * 512 * 512 * 2  # k, v repeated + the mask
    assert extra == 28 * per_layer
    # A single sequence is never padded: no mask, grouped-query attention stays native.
    assert one.term("activations").bytes * 4 == pytest.approx(plain.term("activations").bytes, rel=1e-3)


# Published peaks: the PEFT repository's method comparison (huggingface/peft,
# method_comparison/MetaMathQA/results/*.json, runs of June 2025 on an NVIDIA L40S; torch 2.7.1,
# transformers 4.52.4): meta-llama/Llama-3.2-3B in bf16, batch 4, max_seq_length 768, AdamW,
# plain PyTorch loop with the model's own loss (full logits), no gradient checkpointing.
# "cuda_memory_max" / "accelerator_memory_max" = torch.cuda.max_memory_reserved() over the run.
PUBLISHED = {
    # method: (studio settings equal to the run's PEFT config, trainable count, peak bytes, file)
    "full": ({}, 3_212_749_824, 37_241_225_216, "full-finetuning--llama-3.2-3B-lr_0.00001.json"),
    "lora": ({"r": "32", "lora_alpha": "64", "lora_dropout": "0", "target_modules": "q_proj,v_proj"},
             9_175_040, 22_273_851_392, "lora--llama-3.2-3B-rank32.json"),
    "prompt": ({"num_virtual_tokens": "200"}, 614_400, 24_379_392_000,
               "prompt_tuning--llama-3.2-3B-default.json"),
    "prefix": ({"num_virtual_tokens": "200"}, 11_468_800, 20_912_799_744,
               "prefixtuning--llama-3.2-3B-lr_0.001.json"),
    "ia3": ({}, 286_720, 23_137_878_016, "ia3--llama-3.2-3B-default.json"),  # k, v, down (ff)
    # A later run (January 2026: peft 0.18.1, transformers 4.57.1, torch 2.9.0), same settings.
    "dora": ({"r": "32", "lora_alpha": "64", "lora_dropout": "0", "target_modules": "q_proj,v_proj"},
             9_289_728, 24_540_872_704, "lora--llama-3.2-3B-rank32-dora.json"),
}


@pytest.mark.parametrize("method", list(PUBLISHED))
def test_published_llama_3b_peaks_within_10_percent(method):
    """Every method within 10 % of its published measured peak (the old terms: full fine-tuning
    +80 %, prompt / prefix / IA3 13-19 % low). The published runs computed the loss over the
    full logits (transformers' ForCausalLMLoss: the bf16 logits, their fp32 copy's log-softmax
    and its fp32 gradient, b·s × V × (2 + 4 + 4) B), so that path replaces the studio's
    label-only logits term here; every other term is the studio's own."""
    settings, trainable, peak, _source = PUBLISHED[method]
    arch = ArchInfo.from_config(load_config(str(CONFIGS / "llama3.2-3b.json")))
    assert arch.total_params == 3_212_749_824  # the published model's own count
    result = plan(arch, method, settings, TrainSetup(batch_size=4, seq_len=768, dtype="bf16"))
    assert result["trainable_params"] == trainable
    seq = 768 + (200 if method == "prompt" else 0)
    full_logits = 4 * seq * arch.vocab_size * (2 + 4 + 4)
    total = result["total_bytes"] - result["memory_bytes"]["logits"] + full_logits
    assert 0.90 <= total / peak <= 1.10, f"estimate / published = {total / peak:.3f}"


@pytest.mark.parametrize("batch,seq,low", [(1, 8, 0.95), (2, 64, 0.88)])
def test_full_finetuning_peak_holds_gradients_or_activations_not_both(batch, seq, low):
    """Whole-model training in bf16: the live-tensor peak of a second step (forward, backward,
    foreach AdamW, zero_grad; weights and states already exist) against the gradients the
    estimate holds at the peak plus what autograd saves. With few tokens the peak is the
    optimizer step (all gradients + AdamW's parameter-sized sqrt(v) temporary, which the plain
    sum of gradients and activations missed: 0.64 of the measured peak); with more tokens it is
    the start of the backward (the rest, up to ~10 %, is the backward's own temporaries)."""
    from studio.measure_peak import peak_tensor_bytes

    cfg, arch, params, model = build("full", "bf16")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)  # as on CUDA
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the states exist from the second step on
    peak = peak_tensor_bytes(step)
    est = estimate_training(arch, "full", params, trainable_count(model),
                            TrainSetup(batch, seq, "bf16", device="cpu", masked=False))
    ratio = (est.term("gradients").bytes + est.saved_activation_bytes) / peak
    assert low <= ratio <= 1.05, f"estimate / measured peak = {ratio:.3f}"
