"""BOFT's block-diagonal step in plain torch, so PEFT never compiles its CUDA extension.

PEFT 0.21's BOFT layer (``peft/tuners/boft/layer.py``) calls ``get_fbd_cuda()`` in every
``update_layer``: a ``torch.utils.cpp_extension.load`` JIT build of ``fbd_cuda.cpp`` and
``fbd_cuda_kernel.cu``. On a machine without the CUDA toolkit it fails, once per adapted layer
(the failure is not remembered), with two warnings each; where the toolkit is present it compiles
for minutes into ``~/.cache/torch_extensions``. When it fails PEFT silently sets
``boft_n_butterfly_factor`` to 1 — its pure-torch path (``torch.block_diag`` after
``squeeze(0)``) handles one butterfly factor only — so the model built has fewer trainable
parameters than asked for, and an adapter saved with more factors no longer loads.

The extension does one thing: turn a batch of blocks ``(N, D, H, H)`` into ``N`` block-diagonal
matrices ``(N, D·H, D·H)`` and, backward, read the diagonal blocks of the gradient back out. That
is ``torch.block_diag`` and a strided view, so ``install`` puts an object with the extension's two
functions in PEFT's cache (``_FBD_CUDA``): ``get_fbd_cuda`` returns it without building anything,
every butterfly factor works on a CPU and a GPU alike, and the saved adapters are PEFT's own
format (the same ``boft_R`` shapes a machine with the compiled extension saves and loads).
``install`` also replaces ``BOFTLayer.perm2mat`` (a Python loop writing one 1 per row of an
``in × in`` matrix: seconds per layer on a 70B model's 28,672-wide down projection) by one
indexed write with the same result, and computes the butterfly permutations on the CPU, so a
model with more than one factor can be built on the meta device (PEFT's reads index values).

This file imports nothing from the studio, so it can be run from its path by a process that
must not import the studio (as ``studio/peft_compat.py`` is in the export check). Importing it
costs nothing; ``install`` imports torch and peft.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from typing import Any

LAYER_MODULE = "peft.tuners.boft.layer"


class BlockDiag:
    """The two functions of PEFT's ``fbd_cuda`` extension, in torch (``FastBlockDiag`` calls
    ``forward(input)[0]`` and ``backward(grad_output, input)[0]``)."""

    @staticmethod
    def forward(blocks: Any) -> list:
        import torch

        return [torch.stack([torch.block_diag(*torch.unbind(group)) for group in blocks])]

    @staticmethod
    def backward(grad_output: Any, blocks: Any) -> list:
        n, d, h, _ = blocks.shape
        # Block j of the diagonal is rows and columns j·h … j·h + h - 1: view the gradient as a
        # (d × h) × (d × h) grid and take the diagonal of the block grid.
        grid = grad_output.reshape(n, d, h, d, h)
        return [grid.diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).contiguous()]


def _perm2mat(self: Any, indices: Any) -> Any:
    """PEFT's ``BOFTLayer.perm2mat`` (row i has its 1 in column indices[i]) in one write."""
    import torch

    n = len(indices)
    matrix = torch.zeros((n, n))
    rows = torch.arange(n, device=matrix.device)
    matrix[rows, torch.as_tensor(indices, dtype=torch.long).to(matrix.device)] = 1
    return matrix


def _on_cpu(permutation: Any) -> Any:
    """PEFT's ``block_butterfly_perm`` computed on the CPU whatever the default device: it
    reads index values back (``.item()``), which a model built on the meta device cannot."""
    def block_butterfly_perm(self: Any, *args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.device("cpu"):
            return permutation(self, *args, **kwargs)
    block_butterfly_perm.__wrapped__ = permutation  # type: ignore[attr-defined]
    return block_butterfly_perm


def _patch(layer: Any) -> None:
    layer._FBD_CUDA = BlockDiag()
    cls = layer.BOFTLayer
    cls.perm2mat = _perm2mat
    if not hasattr(cls.block_butterfly_perm, "__wrapped__"):  # once
        cls.block_butterfly_perm = _on_cpu(cls.block_butterfly_perm)


def install() -> None:
    """Patch PEFT's BOFT layer now (imports peft); idempotent."""
    import importlib

    _patch(importlib.import_module(LAYER_MODULE))


class _PatchOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Patches PEFT's BOFT layer module the moment it is first imported, in a process that has
    not imported peft yet (the UI and CLI import the method registry long before torch)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != LAYER_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        _patch(module)


def install_when_imported() -> None:
    """Patch PEFT's BOFT layer now if it is loaded, else when it is first imported; never
    imports torch or peft itself (called when the method registry is imported)."""
    loaded = sys.modules.get(LAYER_MODULE)
    if loaded is not None:
        _patch(loaded)
    elif not any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
