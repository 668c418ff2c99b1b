"""Prefix tuning and prompt tuning: learned virtual tokens, the base model untouched.

* Prompt tuning (Lester et al. 2021) learns p input embeddings: count = p × d.
* Prefix tuning (Li & Liang 2021) learns a key and a value vector per virtual token per layer.
  PEFT sizes each at the width of the key/value projection (num_kv_heads × head_dim, which is
  d only without grouped-query attention): count = p × L × 2 × kv_dim.
  With the reparameterisation MLP (``prefix_projection``), training runs an embedding p × kv_dim,
  then Linear(kv_dim → h) + tanh + Linear(h → L·2·kv_dim):
      count = p·kv + (kv·h + h) + (h·L·2·kv + L·2·kv)
  and the MLP is dropped after training (inference keeps only p × L × 2 × kv_dim values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from studio.arch import ArchInfo
from studio.methods.base import (ADDITIVE, LONGER_CONTEXT, Advice, ApplyContext, Count, MethodSpec, n, param,
                                 peft_type_is)


@dataclass(frozen=True)
class PrefixParams:
    num_virtual_tokens: int = param(20, "Virtual tokens per layer (prefix length p).", min=1, max=512)
    # Off by default, as in PEFT's PrefixTuningConfig (the counts and estimates assume it); the
    # guidance says when to turn it on.
    prefix_projection: bool = param(False, "Train the prefix through a small MLP (off by default, "
                                    "as in PEFT; turn it on if the loss starts far above the base "
                                    "model's: a more stable start, the MLP is dropped afterwards).")
    encoder_hidden_size: int = param(0, "Hidden width of that MLP (0 = the key/value width).",
                                     min=0, max=65536, advanced=True)


@dataclass(frozen=True)
class PromptParams:
    num_virtual_tokens: int = param(20, "Virtual tokens prepended to every input (p).", min=1, max=512)
    init_text: str = param("", "Start the virtual tokens from this text's embeddings (empty: "
                           "random). A task description works well.")


def prefix_count(arch: ArchInfo, p: PrefixParams) -> Count:
    tokens, layers, kv = p.num_virtual_tokens, arch.num_layers, arch.kv_dim
    kept = tokens * layers * 2 * kv
    text = f"p × L × 2 × kv_dim = {tokens} × {layers} × 2 × {kv} = {n(kept)}"
    if not p.prefix_projection:
        return Count(kept, text)
    h = p.encoder_hidden_size or kv
    out = layers * 2 * kv
    total = tokens * kv + (kv * h + h) + (h * out + out)
    return Count(total, f"training: p·kv + (kv·h + h) + (h·L·2·kv + L·2·kv) = {tokens}×{kv} + "
                        f"({kv}×{h} + {h}) + ({h}×{out} + {out}) = {n(total)}; "
                        f"after training {text}")


def prefix_tensors(arch: ArchInfo, p: PrefixParams) -> list[tuple[int, int]]:
    tokens, out = p.num_virtual_tokens, arch.num_layers * 2 * arch.kv_dim
    if not p.prefix_projection:
        return [(tokens * out, 1)]
    kv = arch.kv_dim
    h = p.encoder_hidden_size or kv
    return [(tokens * kv, 1), (kv * h, 1), (h, 1), (h * out, 1), (out, 1)]


def prompt_tensors(arch: ArchInfo, p: PromptParams) -> list[tuple[int, int]]:
    return [(p.num_virtual_tokens * arch.hidden_size, 1)]


def prompt_count(arch: ArchInfo, p: PromptParams) -> Count:
    total = p.num_virtual_tokens * arch.hidden_size
    return Count(total, f"p × d = {p.num_virtual_tokens} × {arch.hidden_size} = {n(total)}")


def apply_prefix(model: Any, arch: ArchInfo, p: PrefixParams, ctx: ApplyContext) -> Any:
    from peft import PrefixTuningConfig, get_peft_model

    kwargs = {"encoder_hidden_size": p.encoder_hidden_size} if p.encoder_hidden_size else {}
    config = PrefixTuningConfig(num_virtual_tokens=p.num_virtual_tokens, task_type="CAUSAL_LM",
                                prefix_projection=p.prefix_projection, **kwargs)
    return get_peft_model(model, config)


def apply_prompt(model: Any, arch: ArchInfo, p: PromptParams, ctx: ApplyContext) -> Any:
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

    kwargs: dict[str, Any] = {}
    if p.init_text:
        # PEFT loads the tokenizer itself, by path, to embed the text.
        tokenizer_path = ctx.tokenizer_path or getattr(model, "name_or_path", None)
        kwargs = dict(prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=p.init_text,
                      tokenizer_name_or_path=tokenizer_path)
    config = PromptTuningConfig(num_virtual_tokens=p.num_virtual_tokens, task_type="CAUSAL_LM", **kwargs)
    return get_peft_model(model, config)


WEAKER = Advice(-2, "weaker on small and mid-size models")
PREFIX = MethodSpec(
    name="prefix", title="Prefix tuning", family=ADDITIVE, mergeable=False,
    inference_overhead=LONGER_CONTEXT,
    guidance="Small and leaves the model untouched; works best on larger models and generation "
             "tasks. The projection MLP is off by default (PEFT's default); turn it on when "
             "the first losses are far above the base model's (random prefixes start far from "
             "it: measured ~8 against 2.7 with the MLP on SmolLM2-135M).",
    params_cls=PrefixParams, count=prefix_count, apply=apply_prefix, tensors=prefix_tensors,
    notes="Cannot merge: the learned keys/values are extra context, not a weight change.",
    prefix_tokens=lambda p: p.num_virtual_tokens, default_learning_rate=1e-2,
    recognises=peft_type_is("PREFIX_TUNING"), advice=WEAKER,
)
PROMPT = MethodSpec(
    name="prompt", title="Prompt tuning", family=ADDITIVE, mergeable=False,
    inference_overhead=LONGER_CONTEXT,
    guidance="The smallest adapters (p × d values). Competitive only on large models (10B+); "
             "on small models expect less than LoRA. Text initialisation helps.",
    params_cls=PromptParams, count=prompt_count, apply=apply_prompt, tensors=prompt_tensors,
    notes="Cannot merge: the virtual tokens are extra input, not a weight change.",
    input_tokens=lambda p: p.num_virtual_tokens, input_trains=True, default_learning_rate=3e-2,
    recognises=peft_type_is("PROMPT_TUNING"), advice=WEAKER,
)
SPECS = [PREFIX, PROMPT]
