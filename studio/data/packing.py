"""Pack short tokenized examples into full sequences whose examples never attend to each other.

Packing removes padding waste: several examples share one row of at most ``max_length`` tokens.
That is only correct if attention, positions and the loss all stay per example. We do not build
a 4D block-diagonal mask ourselves; transformers 5 builds it from ``position_ids``:

What the model needs (transformers 5 Llama-style decoders; sdpa and eager tested, flex alike)
---------------------------------------------------------------------------------------------
``masking_utils.create_causal_mask`` calls ``find_packed_sequence_indices(position_ids)``: every
place where a position id is not the previous one + 1 starts a new sequence, and the mask becomes
"causal on the per-sequence positions AND same sequence" (block diagonal). That detection runs
only when

1. ``position_ids`` restart at 0 for every example (so RoPE also sees each example exactly as it
   would alone),
2. no 2D ``attention_mask`` is passed (with one, the mask is plain padding + causal and packed
   examples see each other), and
3. there is no KV cache: ``past_key_values is None``, i.e. ``use_cache=False``. ``Trainer`` sets
   ``model.config.use_cache = args.use_cache`` (False by default); a model called directly in
   eval mode defaults to ``use_cache=True`` and then silently mixes examples.

Flash-attention 2/3 instead turn ``position_ids`` into ``cu_seqlens`` (varlen kernels) and only
when the batch is a single row (``_is_packed_sequence`` requires ``batch_size == 1``). Hence
:class:`PackedCollator` can emit either one row per pack (``[packs, longest]``: cheapest for sdpa,
whose dense mask grows with the square of the row length) or, with ``flatten=True``, everything
as one ``[1, total]`` row (what flash attention needs; also correct for sdpa).

The loss: ``ForCausalLMLoss`` shifts labels left within a row, so each example's *first* label is
what the previous example's last token would be trained to predict. It must be -100.

Relation to ``transformers.DataCollatorWithFlattening``: that collator concatenates a batch of
examples into one row, restarts ``position_ids`` at 0 per example and writes its ``separator_id``
(-100) over each example's first label: exactly points 1 and the loss rule above. It has no size
bound and no notion of packs, so :func:`pack_examples` decides *which* examples share a row
(bounded by ``max_length``) and :class:`PackedCollator` runs ``DataCollatorWithFlattening`` on
each pack (or on the whole batch, ``flatten=True``), then pads rows. Padding is given its own
positions 0, 1, ... so it forms a separate sequence that no real token attends to, instead of an
``attention_mask`` that would switch packed detection off (point 2). No ``attention_mask`` is
emitted at all.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100


def _as_list(values: Any) -> list[int]:
    return values.tolist() if hasattr(values, "tolist") else list(values)


def pack_examples(features: Iterable[Mapping], max_length: int) -> list[dict]:
    """Best-fit-decreasing packing of tokenized examples into packs of at most ``max_length``.

    ``features`` are mappings with ``input_ids`` and ``labels`` (a tokenized ``Dataset`` works).
    Each pack has ``input_ids``, ``labels`` (concatenated as-is), ``position_ids`` (restarting at
    0 for every example), ``seq_lengths`` and ``example_indices`` (positions in ``features``, in
    pack order). Examples are never split; one longer than ``max_length`` is an error because it
    should have been truncated at tokenization.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    examples: list[tuple[list[int], list[int]]] = []
    for index, feature in enumerate(features):
        ids, labels = _as_list(feature["input_ids"]), _as_list(feature["labels"])
        if len(ids) != len(labels):
            raise ValueError(f"example {index}: {len(ids)} input_ids but {len(labels)} labels")
        if not ids:
            raise ValueError(f"example {index} is empty")
        if len(ids) > max_length:
            raise ValueError(f"example {index} has {len(ids)} tokens, more than max_length="
                             f"{max_length}; truncate it when tokenizing")
        examples.append((ids, labels))

    # Longest first, each into the pack with the least room that still fits it (best fit).
    # ``free`` is kept sorted as (room left, pack number) so the fit is a bisect, not a scan:
    # O(n log n) comparisons for datasets of many thousands of rows. Ties keep input order.
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    members: list[list[int]] = []
    free: list[tuple[int, int]] = []
    for index in order:
        size = len(examples[index][0])
        slot = bisect.bisect_left(free, (size, -1))
        if slot == len(free):
            members.append([index])
            room, pack = max_length - size, len(members) - 1
        else:
            room, pack = free.pop(slot)
            members[pack].append(index)
            room -= size
        if room > 0:
            bisect.insort(free, (room, pack))

    packs = []
    for indices in members:
        pack: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": [],
                                      "seq_lengths": [], "example_indices": list(indices)}
        for index in indices:
            ids, labels = examples[index]
            pack["input_ids"] += ids
            pack["labels"] += labels
            pack["position_ids"] += range(len(ids))
            pack["seq_lengths"].append(len(ids))
        packs.append(pack)
    return packs


def split_pack(pack: Mapping) -> list[dict[str, list[int]]]:
    """The examples inside a pack (an unpacked example is a pack of one)."""
    ids, labels = _as_list(pack["input_ids"]), _as_list(pack["labels"])
    if pack.get("seq_lengths") is not None:
        lengths = _as_list(pack["seq_lengths"])
    elif pack.get("position_ids") is not None:
        # Trainer's remove_unused_columns drops seq_lengths (not a forward() argument) but keeps
        # position_ids; their restarts at 0 mark the same boundaries.
        positions = _as_list(pack["position_ids"])
        starts = [i for i, pos in enumerate(positions) if pos == 0] + [len(positions)]
        if not positions or starts[0] != 0:
            raise ValueError("position_ids of a pack must start at 0")
        lengths = [b - a for a, b in zip(starts, starts[1:])]
    else:
        lengths = [len(ids)]
    if sum(lengths) != len(ids):
        raise ValueError(f"seq_lengths {lengths} do not add up to {len(ids)} tokens")
    examples, start = [], 0
    for length in lengths:
        examples.append({"input_ids": ids[start:start + length],
                         "labels": labels[start:start + length]})
        start += length
    return examples


@dataclass
class PackedCollator:
    """Turn packs (or plain examples) into a padding-free batch: ``input_ids``, ``labels``,
    ``position_ids``, and deliberately no ``attention_mask`` (see the module docstring).

    ``flatten=False``: one row per pack, padded to the longest (multiple of
    ``pad_to_multiple_of``). ``flatten=True``: all examples in one ``[1, total]`` row, required by
    flash-attention's varlen path. The model must run with ``use_cache=False``.
    """

    pad_token_id: int = 0
    flatten: bool = False
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        from transformers import DataCollatorWithFlattening

        # Its defaults are what we need: position_ids from 0, -100 over each first label.
        self._flattening = DataCollatorWithFlattening(return_tensors="pt")

    def __call__(self, packs: Sequence[Mapping]) -> dict[str, Any]:
        import torch

        if not packs:
            raise ValueError("cannot collate an empty batch")
        groups = [split_pack(pack) for pack in packs]
        if self.flatten:
            groups = [[example for group in groups for example in group]]
        rows = [self._flattening(group) for group in groups]
        longest = max(row["input_ids"].shape[1] for row in rows)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, list[torch.Tensor]] = {"input_ids": [], "labels": [], "position_ids": []}
        for row in rows:
            pad = longest - row["input_ids"].shape[1]
            # Padding restarts its positions at 0: its own sequence, invisible to real tokens,
            # and its labels are -100 so it adds nothing to the loss.
            fill = {"input_ids": torch.full((1, pad), self.pad_token_id, dtype=torch.long),
                    "labels": torch.full((1, pad), IGNORE_INDEX, dtype=torch.long),
                    "position_ids": torch.arange(pad, dtype=torch.long).unsqueeze(0)}
            for key in batch:
                batch[key].append(torch.cat([row[key].long(), fill[key]], dim=1))
        return {key: torch.cat(values, dim=0) for key, values in batch.items()}


def packing_efficiency(packs: Sequence[Mapping], max_length: int) -> float:
    """Share of the ``len(packs) * max_length`` token slots that hold real tokens."""
    if not packs:
        return 0.0
    return sum(len(pack["input_ids"]) for pack in packs) / (len(packs) * max_length)
