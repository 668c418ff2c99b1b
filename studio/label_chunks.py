"""How many positions the label-only loss projects at once: one rule, read by the loss
(``studio/worker/label_loss.py``) and by the memory estimate (``studio/estimate.py``), which must
not import torch, hence its own module."""

from __future__ import annotations

CHUNK_LOGIT_BYTES = 64 * 2**20  # fp32 logits of one chunk: 341 positions at V = 49,152


def chunk_positions(vocab_size: int) -> int:
    """Positions per chunk: as many as keep one chunk's fp32 logits ≤ 64 MiB. Large enough for
    an efficient matmul (341 × d × 49,152 for SmolLM2), small beside b·s·V (8 × 128 × 49,152 is
    1,024 positions, 201 MB in fp32)."""
    return max(1, CHUNK_LOGIT_BYTES // (4 * vocab_size))
