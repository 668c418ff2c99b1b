"""Compare tab: one batched generate for the base + 3 LoRA adapters vs 4 generations one after another,
and the memory of 1 vs 6 adapters attached over one copy of the base weights.

    python bench/compare.py [--model default] [--tokens 64] [--repeats 3] [--threads N]

Both paths run on the same ChatEngine, interleaved, each repeat timing batched then sequential, so
a busy machine slows both alike; the ratio (batched / sequential, goal <= 0.6) is the figure.
Every row is forced to produce exactly ``--tokens`` new tokens (min_new_tokens) so both paths do
the same work. The adapters are LoRA r=16 on all 7 projections with random weights (timing and
memory do not depend on what an adapter learned).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from chat_helpers import save_peft_adapter  # noqa: E402  (random LoRA adapter folders)

from studio import models  # noqa: E402
from studio.compare.engine import BASE, ChatEngine  # noqa: E402
from studio.compare.generate import generate_rows  # noqa: E402
from studio.compare.settings import GenerationSettings  # noqa: E402

PROMPT = "Explain in a few sentences why the sky is blue."


def rss() -> int:
    return psutil.Process(os.getpid()).memory_info().rss


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    folder = models.resolve_source(args.model)
    workdir = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    adapters = [save_peft_adapter(folder, workdir / f"lora{i}", "lora", seed=i) for i in range(6)]

    before_load = rss()
    engine = ChatEngine.load(str(folder))
    base_bytes = engine.resident_bytes()
    after_base = rss()
    engine.add_adapter("lora0", adapters[0])
    one = engine.resident_bytes(), rss()
    for i in range(1, 6):
        engine.add_adapter(f"lora{i}", adapters[i])
    six = engine.resident_bytes(), rss()
    for i in range(3, 6):  # the timing uses base + 3 adapters
        engine.remove_adapter(f"lora{i}")

    settings = GenerationSettings(max_new_tokens=args.tokens)
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                                  add_generation_prompt=True)
    columns = [BASE, "lora0", "lora1", "lora2"]
    keys = [BASE] + [engine.adapters[c].key for c in columns[1:]]
    stop = threading.Event()
    exact = dict(min_new_tokens=args.tokens)

    def batched() -> None:
        rows, _, _ = generate_rows(engine._lora_view, engine.tokenizer, [prompt] * 4, settings, stop=stop,
                                   adapter_names=keys, **exact)
        assert all(len(r) == args.tokens for r in rows)

    def sequential() -> None:
        for column in columns:
            with engine.model_for(column) as model:
                rows, _, _ = generate_rows(model, engine.tokenizer, [prompt], settings, stop=stop, **exact)
            assert len(rows[0]) == args.tokens

    batched(), sequential()  # warm-up: first-call allocations and lazy init
    times = {"batched": [], "sequential": []}
    for _ in range(args.repeats):
        times["batched"].append(timed(batched))
        times["sequential"].append(timed(sequential))
    b, s = statistics.median(times["batched"]), statistics.median(times["sequential"])

    mib = 2**20
    print(f"model {args.model}: {sum(p.numel() for p in engine.base.parameters()):,} parameters, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    print(f"\n{args.tokens} new tokens per column, base + 3 LoRA adapters, median of {args.repeats}:\n")
    print("| path | seconds | new tokens/s (all columns) |")
    print("|---|---|---|")
    print(f"| batched: one generate, adapter_names | {b:.2f} | {4 * args.tokens / b:.1f} |")
    print(f"| sequential: 4 generates, adapter switched | {s:.2f} | {4 * args.tokens / s:.1f} |")
    print(f"\n**batched / sequential = {b / s:.2f}** (goal <= 0.6)")
    print("\nMemory (tensor bytes counted once per storage, and process RSS):\n")
    print("| loaded | tensor MiB | RSS growth MiB since before loading |")
    print("|---|---|---|")
    print(f"| base only | {base_bytes / mib:.1f} | {(after_base - before_load) / mib:.0f} |")
    print(f"| base + 1 LoRA | {one[0] / mib:.1f} | {(one[1] - before_load) / mib:.0f} |")
    print(f"| base + 6 LoRA | {six[0] / mib:.1f} | {(six[1] - before_load) / mib:.0f} |")
    print(f"\n6 adapters cost {(six[0] - base_bytes) / mib:.1f} MiB of tensors over the base "
          f"({(six[0] - base_bytes) / base_bytes:.1%} of it); 6 separate models would hold "
          f"{6 * base_bytes / mib:.0f} MiB.")


if __name__ == "__main__":
    main()
