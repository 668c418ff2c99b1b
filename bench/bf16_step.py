"""Which bf16 training step is fast on this CPU: options side by side in one process.

Not a test. One LoRA training step (forward, backward, AdamW) of a model from a folder (default:
the embedded SmolLM2-135M once converted) at batch × length, for each option:

- ``fp32``: fp32 base, SDPA attention (the studio before issue 13)
- ``bf16-peft``: bf16 base, PEFT's defaults (fp32 adapter weights: LoRA casts x to fp32 in every
  layer), under CPU autocast as ``Trainer(bf16=True)`` runs it; SDPA
- ``bf16-nocast``: bf16 base, fp32 adapter weights cast to bf16 at use (``studio.worker.precision
  .compute_adapters_in``): no activation-sized casts; no autocast; SDPA
- ``bf16-nocast-autocast``: the same under CPU autocast (what ``Trainer(bf16=True)`` adds)
- ``bf16-nocast-eager`` / ``bf16-nocast-math``: the same with eager attention, or SDPA forced to
  its math backend
- ``bf16-adapters``: bf16 base and bf16 adapter weights (``autocast_adapter_dtype=False``)

Prints ms per step (median of ``--steps`` after one warm-up) and, with ``--profile``, the top
operators of one step. Run: ``.venv/bin/python bench/bf16_step.py --model DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OPTIONS = ("fp32", "bf16-peft", "bf16-nocast", "bf16-nocast-autocast", "bf16-nocast-eager",
           "bf16-nocast-math", "bf16-adapters")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(model_dir: str, option: str, layers: int | None):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from studio.worker.precision import compute_adapters_in

    bf16 = option != "fp32"
    attn = "eager" if option.endswith("eager") else "sdpa"
    config = AutoConfig.from_pretrained(model_dir)
    if layers:
        config.num_hidden_layers = layers
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, attn_implementation=attn,
                                                 dtype=torch.bfloat16 if bf16 else torch.float32)
    model.config.use_cache = False
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora, autocast_adapter_dtype=option != "bf16-adapters")
    if option.startswith("bf16-nocast"):
        compute_adapters_in(model, torch.bfloat16)
    return model


def context(option: str):
    if option in ("bf16-peft", "bf16-nocast-autocast"):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if option.endswith("math"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def batch(vocab: int, b: int, s: int):
    torch.manual_seed(0)
    ids = torch.randint(10, vocab, (b, s))
    labels = ids.clone()
    labels[:, : s // 2] = -100  # a prompt half without labels, like an assistant-only loss
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--options", default=",".join(OPTIONS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads; 1 on a busy machine (2 threads spin-wait on each other)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for option in args.options.split(","):
        model = build(args.model, option, args.layers)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
        inputs = batch(model.config.vocab_size, args.batch, args.length)
        times, losses = [], []
        for i in range(args.steps + 1):
            started = time.perf_counter()
            with context(option):
                loss = model(**inputs).loss
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if i:
                times.append(time.perf_counter() - started)
            losses.append(loss.item())
        print(f"{option:20s} {statistics.median(times) * 1e3:8.0f} ms/step  losses "
              + " ".join(f"{v:.4f}" for v in losses), flush=True)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof, context(option):
                model(**inputs).loss.backward()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), flush=True)
        del model, optimizer


if __name__ == "__main__":
    main()
