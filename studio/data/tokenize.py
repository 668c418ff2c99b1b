"""Turn canonical rows into training features (``input_ids``, ``labels``, ``attention_mask``)
exactly as training will see them, plus the token statistics and loss preview of the Data tab.

Canonical rows: a chat example is ``{"messages": [{"role", "content"}, ...]}``, a plain-text
(continued pre-training) example is ``{"text": str}``.

How the loss mask of a chat example is computed
-----------------------------------------------
The conversation is rendered once through the tokenizer's chat template and tokenized once with
``add_special_tokens=False`` (the template writes BOS and friends itself; this is what
``apply_chat_template(tokenize=True)`` does too). Those tokens are the training input.

To find which tokens belong to assistant turns we do not rely on ``{% generation %}`` markers /
``return_assistant_tokens_mask``: most templates (SmolLM2's included) lack them. Instead, for the
assistant message at index ``k`` we render two prefixes of the conversation:

* ``messages[:k]`` with the generation prompt: everything up to and including the assistant
  header (``<|im_start|>assistant\\n`` for ChatML), i.e. what the model is given at inference;
* ``messages[:k+1]`` without it: the same plus the assistant's content and end-of-turn marker.

The characters between the two lengths are what the assistant "says". This only works when the
template renders conversations prefix by prefix, so we check that both renders are string
prefixes of the full render; templates that rewrite earlier turns (drop old reasoning, treat the
last message specially) fail that check and raise :class:`ChatTemplateError` instead of silently
training on wrong tokens. Character spans become token spans through the fast tokenizer's offset
mapping, which is immune to BPE merges across a turn boundary (a token-prefix comparison is not;
slow tokenizers fall back to it and raise if a merge breaks it). A token straddling the start of
an assistant span counts as assistant. Whitespace the template writes *after* the end-of-turn
special token (ChatML's ``\\n`` after ``<|im_end|>``) is not trained: the model stops at
``<|im_end|>`` and never has to produce it. A default system prompt that a template injects
(SmolLM2 does when none is given) lies before the first assistant header, so it is never trained.

Known limit: a template whose generation prompt is not the header it renders before assistant
messages (or that ignores ``add_generation_prompt``) fails the prefix check or, if the header is
plain text, trains on the header too. ``loss_on="all"`` needs no spans and works everywhere.

Truncation keeps the start (``"right"``, default): assistant tokens past ``max_length`` are lost
and the row is flagged ``truncated``; a row left without any loss token is dropped by
:func:`tokenize_dataset`.
"""

from __future__ import annotations

import bisect
import html
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # datasets/numpy stay unimported until used, like the rest of the studio
    from datasets import Dataset

IGNORE_INDEX = -100  # the label value torch's cross-entropy (and transformers' loss) skips
ROLES = ("system", "user", "assistant")
LOSS_ON = ("assistant", "all")
TRUNCATION = ("right", "left")
FEATURE_COLUMNS = ("input_ids", "labels", "attention_mask", "length", "truncated")

log = logging.getLogger(__name__)


class ChatTemplateError(ValueError):
    """The chat template's output cannot be split into turns exactly, so a mask would be wrong."""


# --- shared helpers ------------------------------------------------------------------------------


def _check_options(loss_on: str, truncation: str, max_length: int | None) -> None:
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation must be one of {TRUNCATION}, got {truncation!r}")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")


def _clean_messages(messages: Any) -> list[dict[str, str]]:
    """Validate a conversation and keep only role/content (Arrow adds None-valued extra keys)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("a chat example needs a non-empty list of messages")
    cleaned = []
    for i, message in enumerate(messages):
        if (not isinstance(message, Mapping) or message.get("role") not in ROLES
                or not isinstance(message.get("content"), str)):
            raise ValueError(f"message {i} must be {{'role': one of {ROLES}, 'content': str}}, "
                             f"got {message!r}")
        cleaned.append({"role": message["role"], "content": message["content"]})
    return cleaned


def _render(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return ids


def _finish(ids: list[int], labels: list[int], max_length: int | None, truncation: str) -> dict:
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        cut = slice(None, max_length) if truncation == "right" else slice(len(ids) - max_length, None)
        ids, labels = ids[cut], labels[cut]
    return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids),
            "truncated": truncated}


def has_loss_tokens(labels: Sequence[int]) -> bool:
    """Whether any label counts. The first position never does: causal LM loss shifts labels by
    one, so position 0 is never predicted; a row whose only label is there trains nothing."""
    return any(label != IGNORE_INDEX for label in list(labels)[1:])


# --- chat ----------------------------------------------------------------------------------------


def _assistant_char_spans(tokenizer, messages: list[dict], full_text: str) -> list[tuple[int, int]]:
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if k == 0:
            raise ChatTemplateError("the conversation starts with an assistant turn; there is no "
                                    "prompt before it to render (add a user message first)")
        head = _render(tokenizer, messages[:k], add_generation_prompt=True)
        upto = _render(tokenizer, messages[: k + 1], add_generation_prompt=False)
        if not (upto.startswith(head) and full_text.startswith(upto)):
            raise ChatTemplateError(
                f"the chat template does not render this conversation prefix by prefix (at message "
                f"{k}): rendering the first messages with the generation prompt is not the start of "
                "rendering the whole conversation. The template rewrites earlier turns or renders "
                "its generation prompt differently from the assistant header, so the assistant "
                "tokens cannot be located exactly. Use loss_on='all' or another chat template."
            )
        spans.append((len(head), len(upto)))
    return spans


def _prefix_token_count(tokenizer, text: str, ids: list[int], cut: int) -> int:
    """Slow-tokenizer fallback: how many of ``ids`` cover ``text[:cut]``, if tokenizing agrees."""
    prefix = tokenizer(text[:cut], add_special_tokens=False)["input_ids"]
    if ids[: len(prefix)] != prefix:
        raise ChatTemplateError(
            "tokens merge across a turn boundary and this tokenizer has no offset mapping (not a "
            "fast tokenizer), so the assistant tokens cannot be located exactly; use loss_on='all'"
        )
    return len(prefix)


def _assistant_token_ranges(tokenizer, messages, text, ids, offsets) -> list[tuple[int, int]]:
    special = _special_ids(tokenizer)
    if offsets is not None:
        starts = [start for start, _ in offsets]
        ends = [end for _, end in offsets]
    ranges = []
    for char_lo, char_hi in _assistant_char_spans(tokenizer, messages, text):
        if offsets is not None:
            lo = bisect.bisect_right(ends, char_lo)  # first token ending after the span start
            hi = bisect.bisect_left(starts, char_hi)  # first token starting at/after the span end
        else:
            lo = _prefix_token_count(tokenizer, text, ids, char_lo)
            hi = _prefix_token_count(tokenizer, text, ids, char_hi)
        # Drop the whitespace separator that follows the end-of-turn special token; only trim when
        # a special token precedes it, so plain-text turn endings stay trained.
        end = hi
        while end > lo and ids[end - 1] not in special and not tokenizer.decode([ids[end - 1]]).strip():
            end -= 1
        if end > lo and ids[end - 1] in special:
            hi = end
        ranges.append((lo, hi))
    return ranges


def encode_chat(tokenizer, messages, *, max_length: int | None, loss_on: str = "assistant",
                truncation: str = "right") -> dict:
    """Render and tokenize one conversation; ``labels`` are ``input_ids`` where the loss counts
    and -100 elsewhere. Returns ``input_ids, labels, attention_mask, truncated``.

    ``max_length=None`` means no truncation (used for statistics)."""
    _check_options(loss_on, truncation, max_length)
    messages = _clean_messages(messages)
    text = _render(tokenizer, messages, add_generation_prompt=False)
    fast = bool(getattr(tokenizer, "is_fast", False))
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=fast)
    ids = list(encoding["input_ids"])
    if loss_on == "all":
        labels = list(ids)
    else:
        labels = [IGNORE_INDEX] * len(ids)
        offsets = encoding["offset_mapping"] if fast else None
        for lo, hi in _assistant_token_ranges(tokenizer, messages, text, ids, offsets):
            labels[lo:hi] = ids[lo:hi]
    return _finish(ids, labels, max_length, truncation)


# --- plain text ----------------------------------------------------------------------------------


def encode_text(tokenizer, text: str, *, max_length: int | None, truncation: str = "right",
                add_eos: bool = True) -> dict:
    """Tokenize one plain-text document; every token counts in the loss.

    BOS follows the tokenizer's own convention (``add_special_tokens=True`` adds it for Llama-style
    tokenizers, nothing for GPT-2-style ones such as SmolLM2's). EOS is appended unless the
    tokenizer already did, because documents are concatenated or packed in training and the model
    must learn where one ends (for SmolLM2 the EOS is ``<|im_end|>``)."""
    _check_options("all", truncation, max_length)
    if not isinstance(text, str):
        raise ValueError(f"a text example needs a string, got {type(text).__name__}")
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if add_eos and eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return _finish(ids, list(ids), max_length, truncation)


def encode_row(tokenizer, row: Mapping, *, max_length: int | None, loss_on: str = "assistant",
               truncation: str = "right") -> dict:
    """Encode a canonical row of either kind (``messages`` wins when both are set)."""
    if row.get("messages") is not None:
        return encode_chat(tokenizer, row["messages"], max_length=max_length, loss_on=loss_on,
                           truncation=truncation)
    if row.get("text") is not None:
        return encode_text(tokenizer, row["text"], max_length=max_length, truncation=truncation)
    raise ValueError("a row needs 'messages' (chat) or 'text' (plain text)")


# --- datasets ------------------------------------------------------------------------------------


def _encode_batch(batch: dict, tokenizer, max_length: int, loss_on: str) -> dict:
    out: dict[str, list] = {name: [] for name in (*FEATURE_COLUMNS, "_has_loss")}
    size = len(next(iter(batch.values())))
    for i in range(size):
        row = {name: batch[name][i] for name in ("messages", "text") if name in batch}
        features = encode_row(tokenizer, row, max_length=max_length, loss_on=loss_on)
        for name in ("input_ids", "labels", "attention_mask", "truncated"):
            out[name].append(features[name])
        out["length"].append(len(features["input_ids"]))
        out["_has_loss"].append(has_loss_tokens(features["labels"]))
    return out


def tokenize_dataset(dataset: Dataset, tokenizer, *, max_length: int, loss_on: str = "assistant",
                     drop_truncated: bool = False, num_proc: int | None = None,
                     report: dict | None = None) -> Dataset:
    """Tokenize canonical rows into ``input_ids, labels, attention_mask, length, truncated``.

    Rows without a single loss token (e.g. the assistant turn was cut off) are removed, as are
    truncated rows when ``drop_truncated``. The counts are logged and, when ``report`` is a dict,
    written into it: ``rows_in, rows_out, dropped_no_loss, dropped_truncated, truncated_kept``."""
    if "messages" not in dataset.column_names and "text" not in dataset.column_names:
        raise ValueError("the dataset needs a 'messages' or a 'text' column")
    _check_options(loss_on, "right", max_length)
    mapped = dataset.map(
        _encode_batch, batched=True, remove_columns=dataset.column_names, num_proc=num_proc,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "loss_on": loss_on},
        desc="Tokenizing",
    )
    # Decide what to keep in Python rather than a second .filter pass: the two flags are tiny.
    has_loss = list(mapped["_has_loss"])
    truncated = list(mapped["truncated"])
    keep = [i for i, (loss, cut) in enumerate(zip(has_loss, truncated))
            if loss and not (drop_truncated and cut)]
    counts = {
        "rows_in": len(has_loss),
        "rows_out": len(keep),
        "dropped_no_loss": has_loss.count(False),
        "dropped_truncated": sum(1 for loss, cut in zip(has_loss, truncated)
                                 if loss and cut and drop_truncated),
        "truncated_kept": sum(1 for i in keep if truncated[i]),
    }
    log.info("tokenized %(rows_in)d rows: kept %(rows_out)d, dropped %(dropped_no_loss)d without "
             "loss tokens and %(dropped_truncated)d truncated", counts)
    if report is not None:
        report.update(counts)
    if len(keep) != len(has_loss):
        mapped = mapped.select(keep)
    return mapped.remove_columns("_has_loss")


# --- statistics ----------------------------------------------------------------------------------


def token_lengths(tokenizer, rows: Iterable[Mapping]) -> list[int]:
    """Untruncated token count of every row, as training would tokenize it."""
    # loss_on="all" skips the prefix renders: lengths do not depend on the mask.
    return [len(encode_row(tokenizer, row, max_length=None, loss_on="all")["input_ids"])
            for row in rows]


def length_stats(lengths: Iterable[int], bins: int = 20) -> dict:
    """count, min, max, mean, median, p90, p99 and a histogram ``{"edges", "counts"}``."""
    import numpy as np

    values = np.asarray(list(lengths), dtype=np.int64)
    if values.size == 0:
        return {"count": 0, "min": None, "max": None, "mean": None, "median": None, "p90": None,
                "p99": None, "histogram": {"edges": [], "counts": []}}
    # No more bins than distinct integer values, so no bin is structurally empty.
    n_bins = max(1, min(bins, int(values.max() - values.min()) + 1))
    counts, edges = np.histogram(values, bins=n_bins)
    return {
        "count": int(values.size),
        "min": int(values.min()),
        "max": int(values.max()),
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "p90": float(np.percentile(values, 90)),
        "p99": float(np.percentile(values, 99)),
        "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]},
    }


# --- preview -------------------------------------------------------------------------------------


def render_preview(tokenizer, messages, *, max_length: int | None,
                   loss_on: str = "assistant") -> list[tuple[str, bool]]:
    """The rendered conversation as consecutive ``(text, counts_in_loss)`` segments.

    Built by decoding runs of the very tokens ``encode_chat`` returns (after truncation), so the
    preview shows exactly what training sees, cut-off included."""
    features = encode_chat(tokenizer, messages, max_length=max_length, loss_on=loss_on)
    ids, labels = features["input_ids"], features["labels"]
    segments: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            text = tokenizer.decode(ids[start:i], skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)
            segments.append((text, labels[start] != IGNORE_INDEX))
            start = i
    return segments


def preview_html(segments: Iterable[tuple[str, bool]]) -> str:
    """Segments as escaped HTML; loss segments wrapped in ``<mark class="loss">``."""
    parts = []
    for text, counts in segments:
        escaped = html.escape(text)
        parts.append(f'<mark class="loss">{escaped}</mark>' if counts else escaped)
    # pre-wrap keeps the template's newlines and indentation visible without <br> rewriting.
    return ('<div class="token-preview" style="white-space: pre-wrap; font-family: monospace">'
            + "".join(parts) + "</div>")
