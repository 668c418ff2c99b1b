"""Exact-match scoring for the sample tasks.

A prediction scores only if, after a deliberately light per-task normalisation, it *is* the
reference answer. We keep it strict on purpose: the point of a sample task is a metric that a few
minutes of fine-tuning visibly moves, and that a user can read as "did the model answer in the
right format". A base chat model usually knows the answer but wraps it ("Sure! The date is
2021-03-05.") or formats it its own way; counting those as hits would hide exactly what the
fine-tune teaches. So the normalisers only forgive what nobody would call a different answer:

* every task: surrounding whitespace (a trailing newline, a leading space) is ignored;
* ``dates``: nothing more; ``2021-03-05`` or a miss;
* ``sentiment``: case and one trailing period are ignored (``Positive.`` == ``positive``);
* ``json_fields``: both sides are parsed as JSON and the values compared, so key order and spacing
  (``{"age":34}`` vs ``{"age": 34}``) don't matter but values and types do (``"34"`` != ``34``,
  ``34.0`` != ``34``). A prediction that is not valid JSON (a code fence, trailing prose) is wrong.

Anything else, such as extra words before or after the answer, is a miss.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from studio.samples import SAMPLE_TASKS


def _strip(text: str) -> str:
    return text.strip()


def _sentiment(text: str) -> str:
    text = text.strip().lower()
    return text[:-1] if text.endswith(".") else text


class _NotJSON(ValueError):
    pass


def _reject_constant(name: str) -> None:
    # json.loads accepts NaN / Infinity, which are not JSON; treat them as invalid.
    raise _NotJSON(name)


def _canonical_json(text: str) -> str:
    """The parsed value re-dumped with sorted keys and fixed separators; _NotJSON if unparsable.

    Re-dumping (rather than comparing Python objects) keeps types apart: Python says
    ``34 == 34.0`` and ``1 == True``, but their JSON forms differ.
    """
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:  # JSONDecodeError is a ValueError
        raise _NotJSON(str(exc)) from None
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _json_fields(text: str) -> str:
    text = text.strip()
    try:
        return _canonical_json(text)
    except _NotJSON:
        return text  # left as is; exact_match counts an unparsable prediction as a miss anyway


NORMALIZERS: dict[str, Callable[[str], str]] = {
    "dates": _strip,
    "json_fields": _json_fields,
    "sentiment": _sentiment,
}


def _normalizer(task_name: str) -> Callable[[str], str]:
    if task_name not in NORMALIZERS:
        valid = ", ".join(sorted(SAMPLE_TASKS))
        raise KeyError(f"unknown sample task {task_name!r}; valid names: {valid}")
    return NORMALIZERS[task_name]


def normalize(task_name: str, text: str) -> str:
    """``text`` as the scorer compares it for ``task_name`` (see the module docstring)."""
    return _normalizer(task_name)(text)


def exact_match(task_name: str, prediction: str, reference: str) -> bool:
    """Whether ``prediction`` is the reference answer once both are normalised."""
    normalizer = _normalizer(task_name)
    if task_name == "json_fields":
        try:
            return _canonical_json(prediction.strip()) == _canonical_json(reference.strip())
        except _NotJSON:
            return False
    return normalizer(prediction) == normalizer(reference)


def exact_match_rate(
    task_name: str, predictions: Sequence[str], references: Sequence[str]
) -> float:
    """The fraction (0.0 to 1.0) of predictions that exactly match their reference."""
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references; they must pair up"
        )
    if not references:
        raise ValueError("no predictions to score")
    hits = sum(exact_match(task_name, p, r) for p, r in zip(predictions, references))
    return hits / len(references)


__all__ = ["NORMALIZERS", "exact_match", "exact_match_rate", "normalize"]
