"""One decode step of the serving engine's mixed LoRA batch against the same step on the base.

    python bench/serve_step.py [--rows 16] [--adapters 16] [--rank 16] [--steps 30] [--rounds 5]
                               [--threads N]

What the end-to-end benchmark (``bench/serve.py``) measures through HTTP, with clients, the
scheduler and prefill, is here reduced to the part the adapters add: the embedded SmolLM2-135M
(fp32), ``--adapters`` random LoRA adapters as ``bench/serve.py`` makes them (r ``--rank``,
alpha 2r, on q, k, v, o), attached to one PEFT view over the base, and a batch of ``--rows`` rows
(row i asks adapter i mod k) prefilled once with the same chat prompt. Then one decode step
(one token a row, over a copy of the prefilled cache) is timed ``--steps`` times on the base and
``--steps`` times with ``MixedLoRA`` adding each row's adapter (the engine's batched path),
alternating base / adapters ``--rounds`` times; the medians per side, their ratio (the goal of
issue 16 is ≥ 0.9 end to end), and the same for the rows shuffled (a batch whose order is not
the adapters' slot order, as continuous batching makes it). The adapters' logits are checked
against PEFT's own ``adapter_names`` forward (max difference printed).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # serve.py, beside this script


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30, help="decode steps timed per side and round")
    parser.add_argument("--rounds", type=int, default=5, help="base / adapters alternations")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)

    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer, DynamicCache

    from serve import make_adapters
    from studio import models
    from studio.compare.engine import share_base
    from studio.serve.mixed_lora import MixedLoRA

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = models.resolve_source("default")
    base = models.load_model(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    work = Path(tempfile.mkdtemp(prefix="serve-step-"))
    adapters = make_adapters(folder, work, args.adapters, rank=args.rank)
    names = list(adapters)
    view = PeftModel.from_pretrained(share_base(base), str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        view.load_adapter(str(adapters[name]), adapter_name=name)
    view.eval()
    hooks = MixedLoRA(view, base=base)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours."}],
                                           add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    ids = torch.tensor([prompt] * args.rows)

    def timed(keys: list[str]) -> tuple[list[float], list[float], float]:
        with torch.no_grad():
            cache = DynamicCache(config=base.config)
            step = base(input_ids=ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            peft = view(input_ids=step, adapter_names=keys, cache=copy.deepcopy(cache), use_cache=True).logits
            with hooks.rows(keys):
                ours = base(input_ids=step, cache=copy.deepcopy(cache), use_cache=True).logits
            diff = float((ours - peft).abs().max())
            base_times, lora_times = [], []
            for _ in range(args.rounds):
                for side, out in (("base", base_times), ("lora", lora_times)):
                    caches = [copy.deepcopy(cache) for _ in range(args.steps)]
                    start = time.perf_counter()
                    if side == "base":
                        for c in caches:
                            base(input_ids=step, cache=c, use_cache=True)
                    else:
                        with hooks.rows(keys):
                            for c in caches:
                                base(input_ids=step, cache=c, use_cache=True)
                    out.append((time.perf_counter() - start) / args.steps * 1000)
        return base_times, lora_times, diff

    print(f"load average before: {os.getloadavg()}, torch threads {torch.get_num_threads()}")
    in_order = [names[i % len(names)] for i in range(args.rows)]
    shuffled = in_order[::-1][1:] + in_order[-1:]  # not slot order
    print("| rows | order | base ms/step (median) | adapters ms/step (median) | base / adapters | max logit diff vs PEFT |")
    print("|---|---|---|---|---|---|")
    for label, keys in (("slot order", in_order), ("shuffled", shuffled)):
        base_times, lora_times, diff = timed(keys)
        b, a = statistics.median(base_times), statistics.median(lora_times)
        print(f"| {args.rows} | {label} | {b:.1f} ({min(base_times):.1f}-{max(base_times):.1f}) | "
              f"{a:.1f} ({min(lora_times):.1f}-{max(lora_times):.1f}) | **{b / a:.2f}** | {diff:.1e} |", flush=True)
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
