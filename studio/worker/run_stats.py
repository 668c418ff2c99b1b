"""The figures of a finished training, read from the live trainer's counters (no extra work).

Recorded at the final step of every run: trainable parameters, train time (the whole
``Trainer.train``, evaluations included), the time inside training steps, training tokens/s and
peak memory. History's table and ``bench/train_speed.py`` / ``bench/gpu_check.py`` read them; the
bake-off's heavier measurement of the saved adapter is ``studio/bakeoff/measure.py``, for
bake-off runs only.

Peak memory is two different things and is labelled so: on a GPU ``torch.cuda.max_memory_
allocated`` (tensors only), on the CPU the process's own peak resident set
(``sysinfo.peak_rss_bytes``: weights, activations, optimizer, Python and its libraries;
everything the machine had to hold).
"""

from __future__ import annotations

from typing import Any


def peak_memory() -> dict[str, float]:
    """{"peak_cuda_allocated_bytes": ...} on a GPU, else {"peak_rss_bytes": ...}."""
    import torch

    if torch.cuda.is_available():
        return {"peak_cuda_allocated_bytes": float(torch.cuda.max_memory_allocated())}
    from studio.sysinfo import peak_rss_bytes

    return {"peak_rss_bytes": float(peak_rss_bytes())}


def training_stats(trainer: Any, model: Any, wall_seconds: float) -> dict[str, float]:
    """Figures of the training itself, from the live trainer (see ``StudioTrainer``)."""
    from studio.methods.base import trainable_count

    busy = max(trainer.train_seconds, 1e-9)
    return {"trainable_params": float(trainable_count(model)),
            "train_seconds": float(wall_seconds),  # the whole Trainer.train, evaluations included
            "train_step_seconds": float(trainer.train_seconds),  # forward + backward + step only
            # every rank's tokens (StudioTrainer.tokens_all), over rank 0's time in training steps
            "train_tokens_per_s": getattr(trainer, "tokens_all", trainer.tokens_seen) / busy,
            **peak_memory()}
