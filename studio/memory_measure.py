"""Measuring what the estimator predicts, on a real model: parameter, gradient and optimizer
bytes exactly, and the bytes autograd saves for backward (``saved_tensors_hooks``).

Used by the tests and ``bench/estimate.py`` to hold ``estimate.py`` to account.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch


def padding_mask(batch: int, seq_len: int) -> torch.Tensor:
    """An attention mask as a collator pads to the longest: row i loses its last i tokens (the
    first row is full length), so the batch is masked the way real training batches are."""
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    for row in range(1, batch):
        mask[row, seq_len - min(row, seq_len - 1):] = 0
    return mask


def saved_activation_bytes(model: Any, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor | None = None) -> int:
    """Bytes of distinct storages that autograd holds for backward after one training forward.

    Every tensor packed for backward is recorded with a weak reference; only those still alive
    when the forward ends count (some graphs are built and dropped inside the forward, e.g.
    DoRA's detached weight-norm product, and their memory is reused). Storages are counted once
    however many views of them are saved; parameters are excluded (they are weights, not
    activations). With ``attention_mask`` (see ``padding_mask``) SDPA runs as on a padded batch.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    packed: list[tuple[weakref.ref, int, int]] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        # Save a detached alias (same storage), never the tensor itself: a saved output that
        # still carries its grad_fn makes a node hold itself, a C++ cycle that Python's
        # collector cannot see, and every measured graph, activations and all, would stay in
        # memory for the life of the process (~0.7 GB per call on the 135M model). The alias
        # lives exactly as long as the graph keeps it, which is what is counted below.
        saved = tensor.detach()
        storage = saved.untyped_storage()
        packed.append((weakref.ref(saved), storage.data_ptr(), storage.nbytes()))
        return saved

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=input_ids, labels=input_ids.clone(), attention_mask=attention_mask)
    alive: dict[int, int] = {}
    for ref, key, nbytes in packed:
        if ref() is not None and key not in params:
            alive[key] = max(alive.get(key, 0), nbytes)
    del out
    return sum(alive.values())


def state_bytes(model: Any, optimizer_name: str = "adamw") -> dict[str, int]:
    """Exact bytes of weights (frozen, trainable), gradients and optimizer state after one step."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    if optimizer_name == "adamw":
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    elif optimizer_name == "sgd":
        optimizer = torch.optim.SGD(trainable, lr=1e-4)
    else:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(trainable, lr=1e-4)
    optimizer.step()
    opt = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
              if torch.is_tensor(v) and v.dim() > 0)
    return {
        "frozen": sum(p.numel() * p.element_size() for p in frozen),
        "trainable": sum(p.numel() * p.element_size() for p in trainable),
        "gradients": sum(p.grad.numel() * p.grad.element_size() for p in trainable if p.grad is not None),
        "optimizer": opt,
    }
