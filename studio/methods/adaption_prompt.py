"""LLaMA-Adapter (Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models
with Zero-init Attention", arXiv:2303.16199) through PEFT's ``AdaptionPromptConfig``.

In each of the top ``adapter_layers`` decoder layers a learned prompt of ``adapter_len`` vectors
(hidden-size wide) is projected by the layer's own frozen k and v projections; the layer's
queries attend to it in a separate softmax whose output is scaled by a learned gate that starts
at zero, then added to the attention's output (through the frozen o_proj). A zero gate makes the
adapted model exactly the base at the start ("zero-init attention"). Per adapted layer: the
prompt (adapter_len × d) and one gate:

    count = layers × (adapter_len × d + 1)
    e.g. SmolLM2-135M, every one of its 30 layers, adapter_len 10: 30 × (10 × 576 + 1) = 172,830

PEFT builds the prompt and gate in the dtype of the attention's weights (bf16 on a bf16 base),
so they train in the base's dtype. PEFT implements it for the model types in ``SUPPORTED`` only
(its ``TRANSFORMERS_MODEL_CONFIG``; tests/test_llama_adapter.py checks the two agree); other
families are refused with the reason before anything is built.

Memory (``studio.activations``): only the top ``adapter_layers`` blocks need a backward, so only
they keep activations (``trained_blocks``). In each, the adapter's own attention keeps the
recomputed queries (a), the fp32 softmax over the prompt (h × adapter_len), its cast to the
compute dtype under bf16, and the gated scores (h × adapter_len), per token; and per sequence
the prompt's keys and values repeated to every query head (a × adapter_len each). The lowest
adapted block's input norm and base attention keep nothing (nothing below it trains), and its
queries need no gradient, so its prompt keys are not kept either.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from studio.activations import FP32
from studio.arch import ArchInfo
from studio.methods.base import (ADDITIVE, Advice, ApplyContext, Count, MethodSpec, SettingError, n,
                                 param, peft_type_is)

# PEFT 0.21's adaption_prompt.config.TRANSFORMERS_MODEL_CONFIG keys (kept here so that counting
# and refusing import no torch); model type -> the attention module PEFT wraps.
SUPPORTED = {"llama": "self_attn", "mistral": "self_attn", "gpt2": "attn"}
# GPT-2's fused c_attn: PEFT takes the queries as a slice of its q|k|v output, whose whole
# storage (3 × a per token) stays alive for backward.
FUSED_QKV = ("gpt2",)

GATED_PROMPT_ATTENTION = "an extra attention over the adapter prompt in each adapted layer"


@dataclass(frozen=True)
class AdaptionPromptParams:
    adapter_len: int = param(10, "Learned prompt vectors per adapted layer (the paper uses 10).",
                             min=1, max=512)
    adapter_layers: int = param(0, "How many of the top layers get a prompt (0 = every layer; "
                                "the paper adapts the top 30 of LLaMA-7B's 32).", min=0, max=1024)


def check_architecture(arch: ArchInfo) -> None:
    """Refuse, with the reason, a model PEFT's LLaMA-Adapter does not implement correctly."""
    if arch.model_type not in SUPPORTED:
        raise SettingError(
            f"llama_adapter: PEFT implements LLaMA-Adapter only for the model types "
            f"{', '.join(SUPPORTED)}; this model is '{arch.model_type}' ({arch.architecture}). "
            f"Choose another method (prefix tuning is the closest).")
    # PEFT's adapter attention derives the key/value heads as num_heads // (d // kv_dim): right
    # only when the query heads span exactly the hidden size (Mistral-Nemo's 32 × 128 ≠ 5120).
    a = arch.num_heads * arch.head_dim
    if arch.model_type not in FUSED_QKV and (a != arch.hidden_size or arch.num_heads % arch.num_kv_heads):
        raise SettingError(
            f"llama_adapter: PEFT's adapter attention needs heads × head_dim = hidden size; this "
            f"model has {arch.num_heads} × {arch.head_dim} = {a:,} against {arch.hidden_size:,} "
            f"({arch.num_kv_heads} key/value heads)")


def layers_of(arch: ArchInfo, p: AdaptionPromptParams) -> int:
    """The adapted layers: ``adapter_layers``, 0 meaning all; more than the model has is refused."""
    if p.adapter_layers > arch.num_layers:
        raise SettingError(f"llama_adapter: 'adapter_layers' is {p.adapter_layers} but this model has "
                           f"{arch.num_layers} layers; choose 1 to {arch.num_layers}, or 0 for all of them")
    return p.adapter_layers or arch.num_layers


def adaption_count(arch: ArchInfo, p: AdaptionPromptParams) -> Count:
    check_architecture(arch)
    layers, length, d = layers_of(arch, p), p.adapter_len, arch.hidden_size
    total = layers * (length * d + 1)
    return Count(total, f"layers × (adapter_len × d + 1 gate) = {layers} × ({length} × {d} + 1) = "
                        f"{n(total)}")


def adaption_tensors(arch: ArchInfo, p: AdaptionPromptParams) -> list[tuple[int, int]]:
    check_architecture(arch)
    layers = layers_of(arch, p)
    return [(p.adapter_len * arch.hidden_size, layers), (1, layers)]


def adaption_activations(arch: ArchInfo, p: AdaptionPromptParams, width: int) -> tuple[float, float]:
    """Per token, averaged over the L layers (the module docstring lists what is kept): in each
    adapted block the queries and the scores over the prompt, less the lowest adapted block's
    base attention (q, k, v, output, log-sum-exp), which keeps nothing. (That block's input
    norm is ``input_trains``'s rule; the frozen blocks below are ``trained_blocks``'s.)"""
    layers = layers_of(arch, p)
    a, kv, h = arch.num_heads * arch.head_dim, arch.kv_dim, arch.num_heads
    queries = 3 * a if arch.model_type in FUSED_QKV else a
    cast = width if width < FP32 else 0  # softmax(dtype=fp32).to(bf16): a second copy
    scores = h * p.adapter_len * (FP32 + cast + width)
    lowest_attention = (2 * a + 2 * kv) * width + h * FP32
    return (layers * (queries * width + scores) - lowest_attention) / arch.num_layers, 0.0


def adaption_sequence_activations(arch: ArchInfo, p: AdaptionPromptParams, width: int) -> float:
    """Per sequence, averaged over the L layers: each adapted block keeps its prompt's keys and
    values repeated to every query head (a × adapter_len each); the lowest one's queries need no
    gradient, so its keys are not kept: 2 × layers − 1 such tensors."""
    a = arch.num_heads * arch.head_dim
    return (2 * layers_of(arch, p) - 1) * a * p.adapter_len * width / arch.num_layers


def run_check(p: AdaptionPromptParams, run: Any, device: str | None) -> str | None:
    """An unsupported model or too many ``adapter_layers``, refused before a run row exists
    (``MethodSpec.run_check``); None when the model cannot be read here (the start checks and
    the worker say why)."""
    try:
        arch = _arch_of(run)
        check_architecture(arch)
        layers_of(arch, p)
    except SettingError as exc:
        return f"runspec 'method_settings': {exc}"
    except Exception:  # an unreadable model source: not this method's refusal to make
        return None
    return None


def _arch_of(run: Any) -> ArchInfo:
    """The run's model's shapes: built on the meta device where torch is loaded already (the
    worker, a test), else through the planner's cache (the UI and CLI never import torch)."""
    if "torch" in sys.modules:
        from studio.models import load_config

        return ArchInfo.from_config(load_config(run.model, run.trust_remote_code), run.trust_remote_code)
    from studio import planner

    return planner.arch_for(run.model, run.trust_remote_code)


def apply_adaption(model: Any, arch: ArchInfo, p: AdaptionPromptParams, ctx: ApplyContext) -> Any:
    from peft import AdaptionPromptConfig, get_peft_model

    check_architecture(arch)
    config = AdaptionPromptConfig(adapter_len=p.adapter_len, adapter_layers=layers_of(arch, p),
                                  task_type="CAUSAL_LM")
    return get_peft_model(model, config)


LLAMA_ADAPTER = MethodSpec(
    name="llama_adapter", title="LLaMA-Adapter", family=ADDITIVE, mergeable=False,
    inference_overhead=GATED_PROMPT_ATTENTION,
    guidance="A learned prompt in the top layers behind a zero-initialised gate: training starts "
             "exactly at the base model and stays stable; tiny adapters (one prompt per layer). "
             "Llama, Mistral and GPT-2 models only (PEFT's implementation).",
    params_cls=AdaptionPromptParams, count=adaption_count, apply=apply_adaption,
    tensors=adaption_tensors,
    notes="Cannot merge: the prompt is attended to through its own gated attention, not a "
          "weight change.",
    adapter_in_base_dtype=True,  # PEFT creates the prompt and gate in the attention's dtype
    activations=adaption_activations, sequence_activations=adaption_sequence_activations,
    trained_blocks=layers_of,
    # The paper's rate (Zhang et al. 2023, §4.1: lr 9e-3, weight decay 0.02, 5 epochs).
    default_learning_rate=9e-3,
    recognises=peft_type_is("ADAPTION_PROMPT"), run_check=run_check,
    advice=Advice(-2, "learned prompts: below LoRA on small and mid-size models"),
)
SPECS = [LLAMA_ADAPTER]
