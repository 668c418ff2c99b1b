"""A cheaper mixed LoRA batch: each row's LoRA delta added by a forward hook per LoRA layer.

PEFT's per-row ``adapter_names`` (``_mixed_batch_forward``) loops over the batch's adapters in
every LoRA layer through module calls and list indexing. Here the batch runs on the untouched
base model (``base``; without one, on the view with every row named ``__base__``, so PEFT
computes the base layer only), and a forward hook on each adapted ``Linear`` adds each row's

    y[row] += B_s (A_s x[row]) * scaling_s        (s: the row's adapter; PEFT's own formula
                                                   for an unmerged plain LoRA layer)

The hooks are registered only inside ``rows()``: the base model is untouched outside it.

Two ways to compute it, chosen per layer call:

- per group (``_grouped``): for each adapter of the batch, two ``F.linear`` over its rows
  (contiguous rows as a slice, others through index_select / index_add_). Exactly PEFT's
  operations on the same tensors: logits equal PEFT's bit for bit. Used for prefill (rows of
  several tokens) and batches of few adapters, where it is the cheaper one.
- batched (``_batched``), after S-LoRA (Sheng et al. 2023, "S-LoRA: Serving Thousands of
  Concurrent LoRA Adapters") and Punica's BGMV/SGMV kernels (Chen et al. 2023, "Punica:
  Multi-Tenant LoRA Serving"): each layer's attached adapters are stacked once into persistent
  tensors, ``A`` as [n, r_max, d_in] and ``B`` as [n, d_out, r_max] (ranks zero-padded to the
  largest; rebuilt only when the view's adapters change), and a decode step (one token a row)
  lays its rows out as G groups (the batch's adapters) of at most M rows, X [G, M, d_in] (rows
  missing from a smaller group are zero), then

      Y = bmm(bmm(X, A_g^T), B_g^T) * scaling_g       (Y [G, M, d_out])

  added back to the rows with index_add_ (or one ``+=`` when the layout is the batch itself:
  one row per adapter, in slot order). When every adapter of the layer has the same scaling s
  (the same r and alpha: the usual case) the scaling rides on the add: index_add_'s alpha, or,
  when the layout is the batch, one ``baddbmm_`` (out += s · H B^T) for the product, the scaling
  and the sum. Two ``bmm`` per layer instead of 2 x G ``F.linear``:
  the cost is the adapters' weights read once, not G times a call's overhead. ``A_g`` is the
  stack itself when the batch uses at least half its slots (unused slots get zero rows), else
  the batch's slots gathered (a copy, kept while the batch's adapters stay the same).
  The numbers are the same products and sums, but MKL's batched kernel may block the sums
  differently from ``F.linear``'s: logits agree with PEFT's to fp32 rounding (tested within
  1e-5 of their scale), and zero-padded ranks add exact zeros. Measured on SmolLM2: equal bit
  for bit when every group has the same number of rows; uneven groups (the padded layout)
  differed by up to 3e-5 on logits of a few tens, the kind of difference a batch's size
  already makes in the base's own matmuls.
  When the ranks agree, PEFT's own LoRA weights are made views of the stack's slots, so the
  adapters are held once.

Measured (SmolLM2-135M fp32, 16 rows, one decode step, 16 adapters r16 on q,k,v,o): the base
95 ms, PEFT's ``adapter_names`` about 2.8x, the per-group hooks on the view 152-166 ms (0.6x
the base's speed), on the base 137-145 ms, batched 105-108 ms (0.90x); with 2 threads 70 ms,
130 ms, 115 ms, 76 ms (0.92x). With r8 on q,v only the batched step is 0.99x the base's.

Used only where that formula is the whole adapter: every LoRA layer of the batch's adapters is
a plain ``Linear`` without a variant (DoRA and the like), without a LoRA bias, and no adapter of
the view trains whole modules (``modules_to_save``) or token rows; otherwise ``usable`` says no
and the lane names the adapters per row through PEFT as before.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

# Batched only from this many adapters in a decode step (measured on SmolLM2, 16 rows: at 4
# adapters the batched path was already the cheaper; at 2 they were even).
MIN_BATCHED_GROUPS = 3


@dataclass
class _Layer:
    """One adapted ``Linear``: where the hook goes, PEFT's LoRA layer, and its adapters stacked."""

    target: Any  # the nn.Linear whose output the hook adds to
    lora: Any  # PEFT's LoRA Linear (its lora_A / lora_B / scaling per adapter)
    keys: tuple  # the adapters this layer holds, in slot order
    a: torch.Tensor | None = None  # [n, r_max, d_in]
    b: torch.Tensor | None = None  # [n, d_out, r_max]
    a_t: torch.Tensor | None = None  # a.transpose(1, 2), b.transpose(1, 2): what bmm takes
    b_t: torch.Tensor | None = None
    scaling: torch.Tensor | None = None  # [n, 1, 1]
    uniform: float | None = None  # the one scaling every slot has (the usual case: same r and alpha)
    slot: dict = field(default_factory=dict)  # adapter key -> slot
    # The last subset of slots a batch used, gathered: (slots, a_t, b_t, scaling). A batch keeps
    # its adapters for many decode steps, so the copy is made when its composition changes, not
    # every step (a subset of 16 r16 adapters is ~100 MB of copying per step on SmolLM2).
    gathered: tuple | None = None


@dataclass
class _Layout:
    """A decode batch laid out as groups (G adapters × at most M rows) for one set of slots."""

    slots: torch.Tensor | None  # [G] slots to gather; None: the stack itself (every slot, in order)
    index: torch.Tensor  # [G * M] rows of x (B: the zero row padding a smaller group)
    groups: int
    width: int  # M
    rows: torch.Tensor | None  # [R] the real rows, for index_add_; None: the layout is the batch
    real: torch.Tensor | None  # [R] their positions in the G * M layout; None: all of them
    padded: bool  # index points at the zero row somewhere


class MixedLoRA:
    """The hooks over one PEFT LoRA view (re-scanned when its adapters change)."""

    def __init__(self, view: Any, base: Any = None, batched: bool = True):
        self.view = view
        self.base = base  # run the batch on this model (the view's base weights), hooks on its Linears
        self.batched = batched
        self._keys: tuple = ()
        self._layers: list[_Layer] = []
        self._plain: set[str] = set()  # adapters whose every layer is plain
        self._handles: list = []
        self._groups: list | None = None  # set only inside ``rows()``
        self._layouts: dict = {}  # (layer keys) -> _Layout, for the batch's row keys below
        self._layout_rows: tuple | None = None  # the row keys those layouts were made for
        self._present: dict = {}  # (layer keys) -> how many of the batch's adapters they hold
        self._row_keys: list | None = None

    def _scan(self) -> None:
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        keys = tuple(self.view.peft_config)
        if keys == self._keys:
            return
        self._keys, self._layers = keys, []
        self._layouts, self._layout_rows = {}, None  # made for the old slots
        plain = set(keys)
        inner = self.view.base_model.model
        for name, module in inner.named_modules():
            if isinstance(module, AuxiliaryTrainingWrapper):
                plain.clear()  # whole modules or token rows per adapter: PEFT's own path
                continue
            if not isinstance(module, BaseTunerLayer):
                continue
            if type(module) is not LoraLinear:
                plain -= set(getattr(module, "lora_A", {}) or {}) | set(getattr(module, "lora_embedding_A", {}) or {})
                continue
            for key in module.lora_A:
                if key in module.lora_variant or module.lora_bias.get(key, False):
                    plain.discard(key)
            target = module.base_layer
            if self.base is not None:
                try:
                    target = self.base.get_submodule(name)
                except AttributeError:
                    target = None
                if getattr(target, "weight", None) is not module.base_layer.weight:
                    self.base = None  # not the view's base weights after all: run the view
                    self._keys = ()
                    return self._scan()
            self._layers.append(_Layer(target, module, tuple(k for k in keys if k in module.lora_A)))
        self._plain = plain
        if self.batched:
            for layer in self._layers:
                _stack(layer)

    def close(self) -> None:
        """Forget the view (the hooks exist only inside ``rows()``)."""
        self._keys, self._layers = (), []

    def usable(self, keys: set[str]) -> bool:
        self._scan()
        return keys <= self._plain

    @contextmanager
    def rows(self, row_keys: list[str | None]):
        """Inside: the hooks add each row's adapter (None: the base) to the base output."""
        self._scan()
        groups: dict[str, list[int]] = {}
        for index, key in enumerate(row_keys):
            if key is not None:
                groups.setdefault(key, []).append(index)
        self._groups = [(key, _rows(indices)) for key, indices in groups.items()]
        self._row_keys, self._present = list(row_keys), {}
        if tuple(row_keys) != self._layout_rows:  # the same batch as the last step keeps its layouts
            self._layouts, self._layout_rows = {}, tuple(row_keys)
        self._handles = [layer.target.register_forward_hook(_Hook(self, layer)) for layer in self._layers]
        try:
            yield
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles, self._groups, self._row_keys, self._present = [], None, None, {}

    def _add(self, layer: _Layer, x: torch.Tensor, output: torch.Tensor) -> None:
        present = self._present.get(layer.keys)
        if present is None:  # how many of the batch's adapters this layer holds (once a forward)
            present = self._present[layer.keys] = sum(key in layer.lora.lora_A for key, _ in self._groups)
        if (present >= MIN_BATCHED_GROUPS and layer.a is not None and x.dim() == 3 and x.shape[1] == 1
                and x.dtype == layer.a.dtype == output.dtype):
            self._batched(layer, x, output)
        else:
            self._grouped(layer.lora, x, output)

    def _grouped(self, module: Any, x: torch.Tensor, output: torch.Tensor) -> None:
        for key, rows in self._groups:
            if key not in module.lora_A:
                continue
            # F.linear is exactly what PEFT's bias-free lora_A / lora_B modules run, minus the
            # module call: the same numbers, less overhead.
            a, b = module.lora_A[key].weight, module.lora_B[key].weight
            scaling = module.scaling[key]
            if isinstance(rows, slice):
                delta = F.linear(F.linear(x[rows].to(a.dtype), a), b) * scaling
                output[rows] += delta.to(output.dtype)
            else:
                rows = rows.to(x.device)
                delta = F.linear(F.linear(x.index_select(0, rows).to(a.dtype), a), b) * scaling
                output.index_add_(0, rows, delta.to(output.dtype))

    def _batched(self, layer: _Layer, x: torch.Tensor, output: torch.Tensor) -> None:
        layout = self._layouts.get(layer.keys)
        if layout is None:
            layout = self._layouts[layer.keys] = _layout(layer, self._row_keys, x.device)
        batch, d_in = x.shape[0], x.shape[-1]
        flat = x.reshape(batch, d_in)
        if layout.padded:
            flat = torch.cat([flat, flat.new_zeros(1, d_in)])
        if layout.rows is None:  # the batch is the layout: no copy
            xs = flat.view(layout.groups, layout.width, d_in)
        else:
            xs = flat.index_select(0, layout.index).view(layout.groups, layout.width, d_in)
        a_t, b_t, scaling = layer.a_t, layer.b_t, layer.scaling
        if layout.slots is not None:
            wanted = tuple(layout.slots.tolist())
            if layer.gathered is None or layer.gathered[0] != wanted:
                layer.gathered = (wanted, a_t.index_select(0, layout.slots), b_t.index_select(0, layout.slots),
                                  scaling.index_select(0, layout.slots))
            _, a_t, b_t, scaling = layer.gathered
        hidden = torch.bmm(xs, a_t)
        out = output.view(batch, -1)
        if layer.uniform is not None and layout.rows is None:
            # One kernel for the second product, its scaling and the sum into the base output:
            # out = out + s * (hidden @ B^T) (baddbmm's beta = 1, alpha = s), no delta tensor.
            out.view(layout.groups, layout.width, -1).baddbmm_(hidden, b_t, alpha=layer.uniform)
            return
        delta = torch.bmm(hidden, b_t)
        if layer.uniform is None:
            delta = delta * scaling
        delta = delta.view(layout.groups * layout.width, -1)
        alpha = 1.0 if layer.uniform is None else layer.uniform  # index_add_ scales as it adds
        if layout.rows is None:
            out += delta
        else:
            out.index_add_(0, layout.rows, delta if layout.real is None else delta.index_select(0, layout.real),
                           alpha=alpha)


class _Hook:
    """A forward hook that adds the rows' deltas of one layer (in place; the output returned)."""

    __slots__ = ("owner", "layer")

    def __init__(self, owner: MixedLoRA, layer: _Layer):
        self.owner, self.layer = owner, layer

    def __call__(self, module: Any, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        self.owner._add(self.layer, inputs[0], output)
        return output


def _stack(layer: _Layer) -> None:
    """The layer's adapters as [n, r_max, d_in] / [n, d_out, r_max] tensors (ranks zero-padded)
    and their scalings [n, 1, 1]; nothing when they differ in dtype or device. When every rank is
    r_max, PEFT's own weights are then the stack's slots (no second copy)."""
    lora = layer.lora
    if not layer.keys:
        return
    weights = [(lora.lora_A[k].weight, lora.lora_B[k].weight) for k in layer.keys]
    dtypes = {t.dtype for pair in weights for t in pair}
    devices = {t.device for pair in weights for t in pair}
    if len(dtypes) != 1 or len(devices) != 1:
        return
    r_max = max(a.shape[0] for a, _ in weights)
    d_in, d_out = weights[0][0].shape[1], weights[0][1].shape[0]
    a_stack = weights[0][0].new_zeros(len(weights), r_max, d_in)
    b_stack = weights[0][1].new_zeros(len(weights), d_out, r_max)
    with torch.no_grad():
        for slot, (a, b) in enumerate(weights):
            a_stack[slot, :a.shape[0]] = a
            b_stack[slot, :, :b.shape[1]] = b
        if all(a.shape[0] == r_max and not a.requires_grad and not b.requires_grad for a, b in weights):
            # One copy, not two: PEFT's weights become views of their slots (contiguous, the same
            # values, so PEFT's own path computes the same bits). The stack is freed when the next
            # scan re-points the remaining adapters at a new one.
            for slot, key in enumerate(layer.keys):
                lora.lora_A[key].weight.data = a_stack[slot]
                lora.lora_B[key].weight.data = b_stack[slot]
    layer.a, layer.b = a_stack, b_stack
    layer.a_t, layer.b_t = a_stack.transpose(1, 2), b_stack.transpose(1, 2)  # views: [n, d_in, r], [n, r, d_out]
    layer.scaling = torch.tensor([float(lora.scaling[k]) for k in layer.keys], dtype=a_stack.dtype,
                                 device=a_stack.device).view(-1, 1, 1)
    layer.slot = {k: i for i, k in enumerate(layer.keys)}
    scalings = {float(lora.scaling[k]) for k in layer.keys}
    layer.uniform = scalings.pop() if len(scalings) == 1 else None


def _layout(layer: _Layer, row_keys: list, device: torch.device) -> _Layout:
    """The groups of the rows whose adapter this layer holds: slot order, rows in batch order."""
    by_slot: dict[int, list[int]] = {}
    for row, key in enumerate(row_keys):
        if key in layer.slot:
            by_slot.setdefault(layer.slot[key], []).append(row)
    used = sorted(by_slot)
    # Gathering a subset of the stack copies those adapters' weights (15 of 16 r16 adapters on
    # SmolLM2: ~100 MB) each time the batch's set of adapters changes, which with continuous
    # batching is each time a row joins or leaves. When the batch uses at least half the slots,
    # the whole stack is used instead and the unused slots' groups get zero rows: a little
    # arithmetic on zeros that is never added back, and no copy.
    slots = list(range(len(layer.keys))) if 2 * len(used) >= len(layer.keys) else used
    width = max(len(rows) for rows in by_slot.values())
    batch = len(row_keys)
    index, real, rows = [], [], []
    for g, slot in enumerate(slots):
        members = by_slot.get(slot, [])
        index += members + [batch] * (width - len(members))
        real += [g * width + i for i in range(len(members))]
        rows += members
    padded = batch in index
    as_batch = not padded and rows == list(range(batch))
    whole = slots == list(range(len(layer.keys)))
    tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return _Layout(slots=None if whole else tensor(slots), index=tensor(index), groups=len(slots), width=width,
                   rows=None if as_batch else tensor(rows), real=tensor(real) if padded else None, padded=padded)


def _rows(indices: list[int]) -> slice | torch.Tensor:
    """A slice when the rows are contiguous (a view, no copy), else an index tensor."""
    if indices == list(range(indices[0], indices[-1] + 1)):
        return slice(indices[0], indices[-1] + 1)
    return torch.tensor(indices, dtype=torch.long)
