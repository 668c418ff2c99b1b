"""Lanes: the ways a group of requests is decoded, one scheduler step at a time.

A *row* is one request being answered. Each lane holds the rows one model answers:

- ``DecodeLane``: our own decode loop over the model's forward with a ``DynamicCache``
  (continuous batching: new rows are prefilled as a batch and join the running batch between
  decoding steps; finished rows leave). The mixed lane (every plain LoRA adapter and the base,
  one PEFT view, per-row ``adapter_names``) and each solo adapter's lane are DecodeLanes.
- ``GenerateLane`` (``generate_lane.py``): ``generate`` in a thread of its own, for models whose
  cache our loop cannot pad and concatenate (sliding window, hybrid), taking turns with the
  other lanes one decoding step at a time.

Prompt-learning adapters (prefix and prompt tuning) also go through a DecodeLane, started from
PEFT's own ``get_prompt`` (virtual keys/values, or virtual embeddings put in front of the
prompt), on the view's inner model: so their rows too join and leave a running batch, where
PEFT's ``generate`` takes one batch at a time (and, under transformers 5, needs
``studio.peft_compat`` to see its cache at all). Our loop equals PEFT's forward (tested).

Why our own loop rather than a library's: transformers' continuous batching and ``transformers
serve`` have no per-request PEFT adapter, and vLLM's LoRA serving needs CUDA. The loop is the
plain greedy/sampled decode ``generate`` runs, with rows joining and leaving between steps.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from studio.serve.sampling import choose_rows


@dataclass
class Row:
    completion: Any  # engine.Completion: receives each token, says when the row is done
    key: str | None  # PEFT adapter name in the mixed view; None for a base row or a solo view
    prompt_ids: list[int]
    sampling: Any  # engine.Sampling
    generator: torch.Generator
    adapter: Any = None  # pool.Adapter, released when the row ends (None: the base)
    done: bool = False


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), each row right-aligned: every row's next token is the last column."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


def adapter_names(model: Any, rows: list[Row]) -> dict:
    """PEFT's per-row adapter choice for a mixed LoRA view (``__base__``: no adapter); nothing
    when the model is the plain base (no LoRA adapter attached)."""
    if not hasattr(model, "peft_config"):
        return {}
    from studio.compare.engine import BASE

    return {"adapter_names": [r.key or BASE for r in rows]}


def full_attention_cache(model: Any) -> bool:
    """True when the model's cache is plain full attention (every layer a ``DynamicLayer``): the
    only kind whose keys and values ``DecodeLane`` may pad, concatenate and select by row."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        cache = DynamicCache(config=model.config)
    except (TypeError, ValueError, AttributeError):
        return False
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


class DecodeLane:
    """Continuous batching over one model: our decode loop with a ``DynamicCache``.

    State between steps: the cache (keys/values, batch × heads × columns × head size), the
    attention mask (batch × columns; 0 for left padding) and each row's last token. Rows are
    left-padded so that every row's newest token is the last column.

    - join: new rows are prefilled as one left-padded batch (position ids from the mask:
      cumsum − 1, as ``generate`` does); then the side with fewer columns is left-padded
      (zeros in keys, values and mask) and the two are concatenated on the batch dimension.
    - decode: one token per row; its position is the count of the row's real tokens so far.
    - leave: finished rows are dropped with ``batch_select_indices``, then the left columns no
      remaining row needs (all-zero in the mask) are cut.
    With ``mixed``, ``model_for()`` is a PEFT LoRA view and each row names its adapter through
    PEFT's ``adapter_names`` (``__base__`` for base rows)."""

    def __init__(self, model_for, pad_id: int, max_batch: int, on_error, mixed: bool = False, virtual=None,
                 base: Any = None):
        self.model_for = model_for  # () -> the model now (the mixed view can come and go)
        self.base = base  # mixed lanes: the untouched base model, for batches of base rows only
        self._hooks: Any = None  # mixed lanes: MixedLoRA over the current view
        # (batch) -> a prompt-learning adapter's virtual tokens (PEFT's ``get_prompt``): a cache of
        # keys/values (prefix tuning) or input embeddings (prompt tuning); ``model_for`` is then
        # the view's inner model, so PEFT does not add them a second time.
        self.virtual = virtual
        self.view: Any = None  # the adapter view it serves (a re-attached adapter gets a new lane)
        self.pad_id, self.max_batch, self.on_error, self.mixed = pad_id, max_batch, on_error, mixed
        self.pending: list[Row] = []
        self.rows: list[Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._last: torch.Tensor | None = None  # (batch, 1): each row's newest token, not yet in the cache

    def add(self, row: Row) -> None:
        self.pending.append(row)

    def has_work(self) -> bool:
        return bool(self.pending or self.rows)

    @property
    def running(self) -> list[Row]:
        return self.rows

    def step(self) -> list[Row]:
        """A prefill of the waiting rows (when there is room) or one decoding step; the rows that
        ended (EOS, stop string, budget, cancelled, failed)."""
        ended = self._leave()
        room = self.max_batch - len(self.rows)
        joining: list[Row] = []
        try:
            if self.pending and room > 0:
                joining, self.pending = self.pending[:room], self.pending[room:]
                self._prefill(joining)
            elif self.rows:
                self._decode()
        except Exception as exc:  # a failed forward fails its rows; the lane starts afresh
            failed = [r for r in self.rows + joining if not r.done]
            self.on_error(failed, exc)
            for r in failed:
                r.done = True
            self.rows, self._cache, self._mask, self._last = [], None, None, None
            return ended + failed
        return ended + self._leave()

    def _forward(self, rows: list[Row], inputs: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: Any) -> torch.Tensor:
        """Logits of each row's last position; ``inputs`` are token ids or (prefill of a prompt
        tuning row) embeddings."""
        model = self.model_for()
        extra = {}
        if self.mixed and hasattr(model, "peft_config"):
            model, extra = self._mixed_call(model, rows)
        device = getattr(model, "device", torch.device("cpu"))
        key = "inputs_embeds" if inputs.is_floating_point() else "input_ids"
        extra[key] = inputs.to(device)
        hooked = extra.pop("_hooks", None)
        with torch.no_grad(), (self._hooks.rows(hooked) if hooked is not None else nullcontext()):
            out = model(attention_mask=mask.to(device),
                        position_ids=positions.to(device), cache=cache, use_cache=True, logits_to_keep=1,
                        **extra)
        return out.logits[:, -1, :].float().cpu()

    def _mixed_call(self, view: Any, rows: list[Row]) -> tuple[Any, dict]:
        """How the mixed view answers these rows. PEFT's per-row ``adapter_names`` costs a loop
        over the batch's adapters in every LoRA layer (measured on SmolLM2, 16 rows: a decode
        step 1.5x the base's with one adapter named per row, 2.8x with sixteen), so a batch of
        base rows only runs on the untouched base, and a batch of one adapter runs the view
        with that adapter active; only a batch that really mixes names them per row. The three
        compute the same numbers for a row (the same operations on the same weights). A truly
        mixed batch of plain LoRA adapters runs on the base with ``MixedLoRA``'s hooks adding
        each row's delta (batched over adapters in a decode step: 16 rows of 16 adapters cost
        1.1x the base's step instead of 2.8x); anything else is named per row."""
        keys = {r.key for r in rows}
        if keys == {None}:
            return self.base, {}
        if len(keys) == 1:
            (key,) = keys
            if view.active_adapter != key:
                view.set_adapter(key, inference_mode=True)
            return view, {}
        if self._hooks is None or self._hooks.view is not view:
            from studio.serve.mixed_lora import MixedLoRA

            self._hooks = MixedLoRA(view, base=self.base)
        if self._hooks.usable(keys - {None}):
            if self._hooks.base is not None:  # the base's forward; the hooks add each row's own adapter
                return self.base, {"_hooks": [r.key for r in rows]}
            from studio.compare.engine import BASE

            # every row is the base to PEFT; the hooks add each row's own adapter
            return view, {"adapter_names": [BASE] * len(rows), "_hooks": [r.key for r in rows]}
        return view, adapter_names(view, rows)

    def _accept(self, rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
        tokens = choose_rows(logits, rows)
        for row, token in zip(rows, tokens):
            row.done = row.completion._accept(token)
        return torch.tensor(tokens, dtype=torch.long).unsqueeze(1)

    @torch.no_grad()
    def _prefill(self, joining: list[Row]) -> None:
        from transformers import Cache, DynamicCache

        ids, mask = left_pad([r.prompt_ids for r in joining], self.pad_id)
        model = self.model_for()
        inputs, cache = ids, DynamicCache(config=model.config)
        virtual = self.virtual(len(joining)) if self.virtual is not None else None
        if isinstance(virtual, Cache):
            # Prefix tuning: every row starts from the virtual keys/values.
            cache = virtual
            count = cache.get_seq_length()
        elif virtual is not None:
            # Prompt tuning: the virtual token embeddings go in front of the (left-padded) prompt.
            count = virtual.shape[1]
            embeds = model.get_input_embeddings()(ids.to(virtual.device))
            inputs = torch.cat([virtual.to(embeds.dtype), embeds], dim=1)
        if virtual is not None:
            # As PEFT's forward does, the virtual tokens are seen through ones prepended to the
            # mask, and positions count them: mask [1]*n [0]*pad [1]*prompt gives the prompt
            # positions n, n+1, ... exactly as for the row alone.
            mask = torch.cat([torch.ones((len(joining), count), dtype=mask.dtype), mask], dim=1)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -inputs.shape[1]:]
        logits = self._forward(joining, inputs, mask, positions, cache)
        last = self._accept(joining, logits)
        if not self.rows:
            self.rows, self._cache, self._mask, self._last = list(joining), cache, mask, last
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for old, new in zip(self._cache.layers, cache.layers):
            old.keys = torch.cat([_pad_left(old.keys, width, 2), _pad_left(new.keys, width, 2)], dim=0)
            old.values = torch.cat([_pad_left(old.values, width, 2), _pad_left(new.values, width, 2)], dim=0)
        self._mask = torch.cat([_pad_left(self._mask, width, 1), _pad_left(mask, width, 1)], dim=0)
        self._last = torch.cat([self._last, last], dim=0)
        self.rows = self.rows + list(joining)

    def _decode(self) -> None:
        positions = self._mask.sum(-1, keepdim=True)  # the row's real tokens so far: 0..n-1 are taken
        self._mask = torch.cat([self._mask, torch.ones_like(self._last)], dim=1)
        logits = self._forward(self.rows, self._last, self._mask, positions, self._cache)
        self._last = self._accept(self.rows, logits)

    def _leave(self) -> list[Row]:
        """Drop finished and cancelled rows from the batch and the columns nobody needs."""
        for row in self.rows:
            if not row.done and row.completion._cancel_requested():
                row.completion._finish("cancelled")
                row.done = True
        ended = [r for r in self.rows if r.done]
        if not ended:
            return []
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self._cache, self._mask, self._last = None, None, None
            return ended
        index = torch.tensor(keep, dtype=torch.long)
        self._cache.batch_select_indices(index)
        self._mask, self._last = self._mask[index], self._last[index]
        first = int((self._mask.cumsum(-1) == 0).sum(-1).min())  # leading pad columns every row has
        if first:
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self._mask = self._mask[:, first:]
        return ended


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``tensor`` with zero columns added on the left of ``dim`` up to ``width``."""
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
