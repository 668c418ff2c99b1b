"""Padding-free batches against padded ones, on the embedded 135M model: same examples, same loss.

    python bench/padding_free.py [--model FOLDER] [--task dates] [--batch 8] [--steps 6]
                                 [--dtype fp32|bf16] [--attention sdpa|eager] [--threads 0]

A padded batch (``DataCollatorForSeq2Seq``: every row padded to the longest) and the same
examples as one padding-free row (``studio.data.packing.PackedCollator(flatten=True)``: the rows
concatenated, ``position_ids`` restarting at 0 per example, no attention mask, so transformers
builds the block-diagonal causal mask) go through the same LoRA model (r 16, α 32, dropout 0, all
seven projections) with the studio's label-only loss, forward + backward, no optimizer step,
alternating A B B A. Prints the padding share, s/step of each, their ratio and the largest
relative loss difference (the two must be the same loss: the same labelled positions, each
seeing only its own example). A micro-benchmark of the batch layout; ``bench/train_speed.py``
measures whole runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from label_loss import model_folder, training_model  # noqa: E402  (bench/label_loss.py)
from studio.worker import label_loss  # noqa: E402


def examples(tokenizer, task: str, count: int) -> list[dict]:
    from studio.data.tokenize import encode_chat
    from studio.samples import load_rows, prompt_text

    out = []
    for row in load_rows(task, "train")[:count]:
        messages = [{"role": "user", "content": prompt_text(row)},
                    {"role": "assistant", "content": row["output"]}]
        item = encode_chat(tokenizer, messages, max_length=128)
        out.append({k: list(item[k]) for k in ("input_ids", "labels", "attention_mask")})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--task", default="dates")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--attention", choices=("sdpa", "eager"), default="sdpa")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import DataCollatorForSeq2Seq

    from studio.data.packing import PackedCollator

    folder = model_folder(args.model)
    model, tokenizer = training_model(folder, "lora", args.dtype, args.attention)

    rows = examples(tokenizer, args.task, args.batch * args.steps)
    padded = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    flat = PackedCollator(pad_token_id=tokenizer.pad_token_id, flatten=True)
    groups = [rows[i:i + args.batch] for i in range(0, len(rows), args.batch)]
    layouts = {"padded": [padded(g) for g in groups],
               "padding-free": [flat([{k: e[k] for k in ("input_ids", "labels")} for e in g]) for g in groups]}

    def step(batch: dict) -> float:
        model.zero_grad(set_to_none=True)
        with label_loss.label_only(model):
            out = model(**batch, logits_to_keep=1)
        out.loss.backward()
        return float(out.loss.detach())

    step(layouts["padded"][0])  # warm-up: first-call allocations charged to neither
    seconds = dict.fromkeys(layouts, 0.0)
    worst = 0.0
    for i in range(len(groups)):
        names = list(layouts) if i % 2 == 0 else list(reversed(layouts))
        losses = {}
        for name in names:
            started = time.perf_counter()
            losses[name] = step(layouts[name][i])
            seconds[name] += time.perf_counter() - started
        worst = max(worst, abs(losses["padding-free"] - losses["padded"]) / abs(losses["padded"]))
    real = sum(len(r["input_ids"]) for r in rows)
    positions = sum(b["input_ids"].numel() for b in layouts["padded"])
    print(f"model {folder}, {args.dtype}, {args.attention}, batch {args.batch}, {len(groups)} steps, "
          f"threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}")
    print(f"padded positions: {positions}, real tokens: {real} (padding {1 - real / positions:.0%})")
    print(f"s/step: padded {seconds['padded'] / len(groups):.3f}, padding-free "
          f"{seconds['padding-free'] / len(groups):.3f}, ratio ×{seconds['padded'] / seconds['padding-free']:.2f}")
    print(f"largest relative loss difference: {worst:.2e}")


if __name__ == "__main__":
    main()
