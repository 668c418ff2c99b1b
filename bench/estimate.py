"""Estimator benchmark: speed on a 70B config, and estimate vs measurement for every method.

    python bench/estimate.py [--skip-135m]

1. Time of one full estimate (settings parsing + closed-form count + memory terms) for the
   Llama-3-70B config, median of 1,000 calls, against the 100 ms-per-change budget.
2. For every method on a tiny Llama and on the SmolLM2-135M architecture (random weights; the
   shapes are what matter), fp32 and bf16 on CPU, a padded batch of 2: saved activations
   (estimate / measured with saved_tensors_hooks), and parameter + every gradient + AdamW-state
   bytes (estimate == measured).
3. With CUDA: for the embedded model, bf16, one training step per method, the estimate's total
   (without the runtime allowance) vs ``torch.cuda.max_memory_allocated()``.
Prints Markdown tables (the figures in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import CONFIGS, tiny_llama_config  # noqa: E402

from studio.methods.base import ApplyContext
from studio.arch import ArchInfo  # noqa: E402
from studio.estimate import TrainSetup, estimate_training  # noqa: E402
from studio.memory_measure import padding_mask, saved_activation_bytes, state_bytes  # noqa: E402
from studio.methods import ORDER, get_method  # noqa: E402
from studio.methods.base import trainable_count  # noqa: E402
from studio.models import load_config  # noqa: E402
from studio.planner import plan  # noqa: E402


def time_70b() -> None:
    arch = ArchInfo.from_config(load_config(str(CONFIGS / "llama3-70b.json")))
    samples = []
    for _ in range(1000):
        started = time.perf_counter()
        plan(arch, "qlora", {"r": "16", "lora_alpha": "32"}, TrainSetup(batch_size=4, seq_len=2048))
        samples.append(time.perf_counter() - started)
    median = statistics.median(samples)
    print(f"70B estimate (plan: parse + count + memory), median of 1,000: {median * 1e3:.3f} ms "
          f"= {median / 0.1:.4f} of the 100 ms budget; max {max(samples) * 1e3:.3f} ms\n")


def compare(label: str, cfg, batch: int, seq: int, dtype: str = "fp32") -> None:
    from transformers import AutoModelForCausalLM

    arch = ArchInfo.from_config(cfg)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    print(f"### {label} (padded batch {batch} × {seq} tokens, {dtype}, CPU)\n")
    print("| method | trainable | activations est / measured (MB) | ratio | weights+grads+AdamW est == measured |")
    print("|---|---|---|---|---|")
    for name in ORDER:
        if name == "qlora":
            continue  # needs a 4-bit load; its count equals LoRA's, its state is bitsandbytes'
        spec = get_method(name)
        params = spec.params()
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch_dtype)
        model = spec.apply(base, arch, params, ApplyContext())
        est = estimate_training(arch, name, params, trainable_count(model),
                                TrainSetup(batch_size=batch, seq_len=seq, dtype=dtype, device="cpu"))
        measured = saved_activation_bytes(model, torch.randint(0, cfg.vocab_size, (batch, seq)),
                                          padding_mask(batch, seq))
        state = state_bytes(model)
        est_state = sum(est.term(t).bytes for t in ("weights", "trainable", "optimizer")) + est.gradient_bytes
        ok = est_state == sum(state.values())
        print(f"| {name} | {trainable_count(model):,} | {est.saved_activation_bytes / 1e6:.2f} / "
              f"{measured / 1e6:.2f} | {est.saved_activation_bytes / measured:.3f} | "
              f"{'yes' if ok else f'NO ({est_state:,} vs {sum(state.values()):,})'} |", flush=True)
        del model
    print()


def gpu_check(batch: int = 4, seq: int = 256) -> None:
    """On CUDA only: estimate total vs torch.cuda.max_memory_allocated for one training step."""
    from transformers import AutoModelForCausalLM

    from studio.models import load_model

    print(f"### GPU: {torch.cuda.get_device_name(0)} (batch {batch} × {seq}, bf16, AdamW)\n")
    print("| method | estimate (GiB, without runtime allowance) | max allocated (GiB) | ratio |")
    print("|---|---|---|---|")
    cfg = load_config("default")
    arch = ArchInfo.from_config(cfg)
    for name in ("lora", "dora", "ia3", "prompt", "houlsby", "full", "qlora"):
        spec = get_method(name)
        params = spec.params({"bnb_4bit_compute_dtype": "bfloat16"} if name == "qlora" else {})
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        kwargs = {}
        if spec.quantized:
            from studio.methods.qlora import quantization_config
            kwargs["quantization_config"] = quantization_config(params)
        model = load_model("default", dtype="bfloat16", device=None if spec.quantized else "cuda",
                           device_map="cuda" if spec.quantized else None, **kwargs)
        model = spec.apply(model, arch, params, ApplyContext())
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-5)
        ids = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda")
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        peak = torch.cuda.max_memory_allocated()
        est = estimate_training(arch, name, params, trainable_count(model),
                                TrainSetup(batch, seq, "bf16", quant="nf4" if spec.quantized else "none",
                                           device="cpu"))
        print(f"| {name} | {est.total_bytes / 2**30:.3f} | {peak / 2**30:.3f} | {est.total_bytes / peak:.3f} |",
              flush=True)
        del model, optimizer
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-135m", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    time_70b()
    for dtype in ("fp32", "bf16"):
        compare("tiny Llama (d=64, L=2, GQA 4/2, vocab 512)", tiny_llama_config(), 2, 32, dtype)
        if not args.skip_135m:
            compare("SmolLM2-135M architecture", load_config(str(CONFIGS / "smollm2-135m.json")), 2, 64, dtype)
    if torch.cuda.is_available():
        gpu_check()
    else:
        print("No CUDA device: the GPU comparison (estimate vs max_memory_allocated) was skipped.")


if __name__ == "__main__":
    main()
