"""The peak of live tensor memory during a call, on the CPU too.

``torch.cuda.max_memory_allocated`` has no CPU counterpart, and the process's RSS moves with the
allocator's caching, the Python heap and other threads. This counts what the tensors themselves
hold: every storage an operator creates (forward, backward and autograd's recomputations alike)
is recorded with a weak reference through a ``TorchDispatchMode``, and after each operator the
storages still alive are summed; the largest sum is the peak. Storages that existed before the
call (weights, inputs) are not counted: the figure is what the call added at its worst moment.

Used by tests and benchmarks to compare two ways of computing the same thing (e.g. the
label-only loss against the full logits), not as a process-wide memory figure.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorPeak(TorchDispatchMode):
    """``with LiveTensorPeak() as meter: ...`` then ``meter.peak_bytes``."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # A view or an in-place result shares an input's storage: not a new allocation.
        inputs = {value.untyped_storage()._cdata for value in tree_flatten((args, kwargs))[0]
                  if isinstance(value, torch.Tensor) and value.device.type != "meta"}
        # Forget the storages freed since the last operator first: a new storage may reuse the
        # address (our key) of one that died.
        self.live = {key: (ref, size) for key, (ref, size) in self.live.items() if not ref.expired()}
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                storage = value.untyped_storage()
                if storage._cdata in inputs:
                    continue
                self.live.setdefault(storage._cdata, (StorageWeakRef(storage), storage.nbytes()))
        self.peak_bytes = max(self.peak_bytes, sum(size for _, size in self.live.values()))
        return out


def peak_tensor_bytes(call: Callable[[], Any]) -> int:
    """The peak of tensor bytes created by ``call()`` and alive at the same time."""
    with LiveTensorPeak() as meter:
        call()
    return meter.peak_bytes
