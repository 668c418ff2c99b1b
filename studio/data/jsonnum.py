"""JSON integers too long for Python to read: kept as a placeholder and named, not a crash.

Python refuses to turn text of more than 4,300 digits into an ``int`` (a guard against
quadratic-time conversion, ``sys.get_int_max_str_digits``), and ``json`` lets that ``ValueError``
out of the whole parse with no line or field, so one such number in one row aborted an import and
its preview. The readers decode with ``Decoder``, which keeps such a number as a ``HugeNumber``
and counts it, then ask ``huge_number`` where it is: the row is dropped (or the import refused)
with its line and field like any other row that cannot be read. The limit is not raised: the
number would still cost quadratic time later (``str()`` in validation, ``json.dumps``).
"""

from __future__ import annotations

import json
import sys

CODE = "huge_number"


class HugeNumber:
    """An integer literal too long to read; only its length is kept (the text can be megabytes)."""

    __slots__ = ("digits",)

    def __init__(self, text: str) -> None:
        self.digits = len(text.lstrip("-"))

    def __repr__(self) -> str:
        return f"a number with {self.digits:,} digits"


class Decoder(json.JSONDecoder):
    """``json.JSONDecoder`` whose too-long integers become ``HugeNumber``; ``seen`` counts them,
    so a reader walks a record looking for one only when the file has one."""

    def __init__(self) -> None:
        super().__init__(parse_int=self._int)
        self.seen = 0

    def _int(self, text: str) -> int | HugeNumber:
        try:
            return int(text)
        except ValueError:  # "Exceeds the limit (4300 digits) for integer string conversion"
            self.seen += 1
            return HugeNumber(text)


def limit() -> int:
    return sys.get_int_max_str_digits()


def describe(number: HugeNumber) -> str:
    return (f"a number with {number.digits:,} digits (more than the {limit():,} a number may "
            "have)")


def huge_number(record: object) -> tuple[str | None, str] | None:
    """(top-level field, message) for the first ``HugeNumber`` in a decoded record, else None.

    Walks with an explicit stack: a record may be nested as deep as the parser allowed."""
    stack: list[tuple[object, tuple]] = [(record, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, HugeNumber):
            field = str(path[0]) if path else None
            inside = _place(path[1:])
            where = f" in {inside}" if inside else ""
            return field, f"{describe(value)}{where}; put it in quotes to keep it as text"
        if isinstance(value, dict):
            stack.extend((v, path + (k,)) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((v, path + (i,)) for i, v in reversed(list(enumerate(value, 1))))
    return None


def _place(path: tuple) -> str:
    """'item 2, key 'content'' for the part of the path below the top-level field."""
    return ", ".join(f"item {p}" if isinstance(p, int) else f"key {p!r}" for p in path)
