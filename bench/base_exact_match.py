"""Exact match of the untrained embedded model on every sample task's eval split.

    python bench/base_exact_match.py [--model default] [--limit N]

Prints one Markdown row per task (the figures recorded in docs/benchmarks.md) and two example
answers each, so a reader sees *why* the base model misses.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from studio import models
from studio.evaluate import score_task
from studio.samples import SAMPLE_TASKS, get_task, load_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()

    started = time.perf_counter()
    tokenizer = models.load_tokenizer(args.model)
    model = models.load_model(args.model).eval()
    print(f"model {args.model} loaded in {time.perf_counter() - started:.1f} s; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}")
    print("| task | eval examples | correct | exact match | seconds |")
    print("|---|---|---|---|---|")
    examples = {}
    for name in SAMPLE_TASKS:
        score = score_task(model, tokenizer, name, limit=args.limit)
        examples[name] = score.predictions[:2]
        print(f"| {name} | {score.examples} | {score.correct} | {score.exact_match:.1%} | "
              f"{score.seconds:.0f} |", flush=True)
    for name, predictions in examples.items():
        rows = load_rows(get_task(name), "eval")
        for prediction, row in zip(predictions, rows):
            print(f"{name}: expected {row['output']!r}, base answered {prediction[:80]!r}")


if __name__ == "__main__":
    main()
