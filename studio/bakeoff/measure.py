"""The bake-off's measurements of a trained run, made in the worker process (imports torch).

Bake-off runs only (every run records its training figures: ``studio/worker/run_stats.py``).
``measure_trained`` after the adapter is saved: the adapter's file size, then the model rebuilt from that saved folder (so the
figures are those of the artefact a user keeps, not of the training process's model), merged
where the method merges, scored by exact match on the eval split (a sample task's, or an
imported chat dataset's) and timed generating a fixed number of tokens.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
SPEED_NEW_TOKENS = 32  # per prompt, forced (min = max), so every method generates the same work
SPEED_PROMPTS = 3


def weights_bytes(folder: Path) -> int:
    """Bytes of the saved weights (the tokenizer copy beside them is not the adapter)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*")
               if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def measure_trained(spec: Any, adapter: Path, em_limit: int, progress=print, *, eval_rows: Any = None,
                    unscored=None) -> dict[str, float]:
    """adapter_bytes, inference_merged (1/0), eval_exact_match (when the data can be scored),
    inference_tokens_per_s, for the run's saved adapter folder.

    Exact match is scored on the sample task's eval split, or on ``eval_rows``, the imported
    dataset's canonical eval rows (``studio.evaluate.score_dataset``). When those cannot be
    scored (plain text, an empty eval split) nothing is recorded and ``unscored(reason)`` is
    called, so the caller can say why the column stays empty."""
    import torch

    from studio import models
    from studio.export.load import load_trained
    from studio.methods import get_method

    method = get_method(spec.method)
    out: dict[str, float] = {"adapter_bytes": float(weights_bytes(adapter))}
    # QLoRA merges into the de-quantised base: the merged model a user would export.
    model = load_trained(spec, adapter, dequantize=method.quantized and method.mergeable)
    merged = False
    if method.mergeable and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
        merged = True
    if torch.cuda.is_available() and not method.quantized:
        model.to("cuda")
    model.eval()
    model.config.use_cache = True
    out["inference_merged"] = 1.0 if merged else 0.0
    tokenizer = models.load_tokenizer(spec.model, spec.trust_remote_code)
    prompts = eval_prompts(spec)
    kind = "merged" if merged else "adapter"
    if em_limit > 0 and spec.sample_task:
        from studio.evaluate import score_task

        progress(f"bake-off: exact match on {em_limit} eval rows ({kind})")
        out["eval_exact_match"] = score_task(model, tokenizer, spec.sample_task, limit=em_limit).exact_match
    elif em_limit > 0 and eval_rows is not None:
        from studio.evaluate import eval_examples, score_examples

        examples = eval_examples(eval_rows, tokenizer, em_limit)
        if examples.references:
            progress(f"bake-off: exact match on {len(examples)} eval rows of the dataset ({kind}; "
                     f"{examples.skipped} skipped)")
            out["eval_exact_match"] = score_examples(model, tokenizer, examples).exact_match
        else:
            progress(f"bake-off: exact match not measured: {examples.reason}")
            if unscored is not None:
                unscored(f"no exact match: {examples.reason}")
    progress("bake-off: timing generation")
    out["inference_tokens_per_s"] = generation_speed(model, tokenizer, prompts[:SPEED_PROMPTS])
    return out


def eval_prompts(spec: Any) -> list[str]:
    """User messages to time generation with: the sample task's eval prompts, or fixed ones."""
    if spec.sample_task:
        from studio.samples import load_rows, prompt_text

        return [prompt_text(r) for r in load_rows(spec.sample_task, "eval")]
    return ["Write one sentence about the sea.", "List three colours.", "What is 12 plus 30?"]


def generation_speed(model: Any, tokenizer: Any, user_messages: list[str],
                     new_tokens: int = SPEED_NEW_TOKENS) -> float:
    """Greedy tokens/s at batch 1, every prompt forced to exactly ``new_tokens`` new tokens
    (a method that stops early must not look faster); one short warm-up first."""
    import torch

    from studio.evaluate import chat_prompts

    texts = chat_prompts(tokenizer, user_messages)

    def generate(text: str, count: int) -> None:
        batch = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=count, min_new_tokens=count, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)

    generate(texts[0], 4)
    started = time.perf_counter()
    for text in texts:
        generate(text, new_tokens)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return new_tokens * len(texts) / (time.perf_counter() - started)
