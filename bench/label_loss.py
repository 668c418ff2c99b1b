"""The label-only loss against the model's own full-logits loss, on the embedded 135M model.

    python bench/label_loss.py [--model FOLDER] [--task dates] [--batch 8] [--steps 6]
                               [--threads 2] [--method lora]

The same real batches (a sample task, chat template, loss on the assistant turn only, padded to
the longest row) through the same LoRA model (r 16, α 32, dropout 0, all seven projections),
forward + backward, no optimizer step, so both paths see the same weights. The two paths
alternate A B B A so that a machine that speeds up or slows down is charged to both. Prints the
labelled share of positions, time per step of each and their ratio, the peak of live tensor
bytes during one step of each (``studio.measure_peak``; weights and inputs excluded) and the
largest relative difference of the losses. A micro-benchmark of the loss path only: the whole
worker is measured by ``bench/train_speed.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from studio.methods.base import ApplyContext  # noqa: E402
from studio.measure_peak import peak_tensor_bytes  # noqa: E402
from studio.worker import label_loss  # noqa: E402


def model_folder(given: str | None) -> str:
    if given:
        return given
    from studio.models import convert_gguf, embedded_gguf_path, gguf_cache_dir

    folder = gguf_cache_dir(embedded_gguf_path(), embedded=True)
    if not (folder / "model.safetensors").is_file():
        convert_gguf(embedded_gguf_path(), folder)
    return str(folder)


def training_model(folder: str, method: str = "lora", dtype: str = "fp32", attention: str | None = None):
    """(model with ``method`` applied in training mode, tokenizer): LoRA-type methods at r 16,
    α 32, dropout 0 on all seven projections; a bf16 model computes its adapters in bf16 as the
    worker does (``precision.compute_adapters_in``)."""
    from studio.arch import ArchInfo
    from studio.methods import get_method
    from studio.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(folder)
    extra = {"attn_implementation": attention} if attention else {}
    model = load_model(folder, dtype="bfloat16" if dtype == "bf16" else "float32", **extra)
    model.config.use_cache = False
    spec = get_method(method)
    settings = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0} if "lora" in method else {}
    model = spec.apply(model, ArchInfo.from_model(model), spec.params(settings), ApplyContext())
    if dtype == "bf16":
        from studio.worker.precision import compute_adapters_in

        compute_adapters_in(model, torch.bfloat16)
    model.train()
    return model, tokenizer


def batches(tokenizer, task: str, batch: int, steps: int) -> list[dict]:
    from transformers import DataCollatorForSeq2Seq

    from studio.data.tokenize import encode_chat
    from studio.samples import load_rows, prompt_text

    rows = load_rows(task, "train")[: batch * steps]
    encoded = []
    for row in rows:
        messages = [{"role": "user", "content": prompt_text(row)},
                    {"role": "assistant", "content": row["output"]}]
        item = encode_chat(tokenizer, messages, max_length=128)
        encoded.append({k: item[k] for k in ("input_ids", "labels", "attention_mask")})
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    return [collate(encoded[i:i + batch]) for i in range(0, len(encoded), batch)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--task", default="dates")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    folder = model_folder(args.model)
    model, tokenizer = training_model(folder, args.method)
    data = batches(tokenizer, args.task, args.batch, args.steps)

    def full(b):
        out = model(**b)
        out.loss.backward()
        return float(out.loss.detach())

    def fast(b):
        with label_loss.label_only(model):
            out = model(**b, logits_to_keep=1)
        out.loss.backward()
        return float(out.loss.detach())

    seconds = {"full": 0.0, "fast": 0.0}
    worst = 0.0
    for i, b in enumerate(data):
        order = (("full", full), ("fast", fast)) if i % 2 == 0 else (("fast", fast), ("full", full))
        losses = {}
        for name, call in order:
            model.zero_grad(set_to_none=True)
            started = time.perf_counter()
            losses[name] = call(b)
            seconds[name] += time.perf_counter() - started
        worst = max(worst, abs(losses["fast"] - losses["full"]) / abs(losses["full"]))
    peaks = {name: peak_tensor_bytes(lambda c=call: c(data[0])) for name, call in (("full", full), ("fast", fast))}
    labelled = sum(int((b["labels"][:, 1:] != -100).sum()) for b in data)
    positions = sum(b["labels"].numel() for b in data)
    print(f"model {folder}, method {args.method}, batch {args.batch}, {len(data)} steps, "
          f"threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}")
    print(f"labelled positions: {labelled} of {positions} ({labelled / positions:.0%}); "
          f"mean row length {positions / len(data) / args.batch:.0f}")
    print(f"s/step: full {seconds['full'] / len(data):.3f}, label-only {seconds['fast'] / len(data):.3f}, "
          f"ratio (full / label-only) ×{seconds['full'] / seconds['fast']:.2f}")
    print(f"peak live tensors in one step: full {peaks['full'] / 1e6:.0f} MB, label-only "
          f"{peaks['fast'] / 1e6:.0f} MB (×{peaks['full'] / peaks['fast']:.2f} less)")
    print(f"largest relative loss difference: {worst:.2e}")


if __name__ == "__main__":
    main()
