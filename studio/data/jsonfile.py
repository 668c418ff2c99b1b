"""Read the records of one ``.json`` file (not JSONL) without loading a large array whole.

A top-level array is parsed element by element from a sliding buffer, so memory stays around one
record however big the file is. The object forms, ``{"data": [...]}`` (or rows/records/examples/
train) and the column form ``{"col": [v1, v2, ...], ...}``, cannot be walked that way with the
standard library, so they are loaded whole, and only up to ``OBJECT_MAX_BYTES``; past that the
message asks for JSONL.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from .errors import FormatError
from .jsonnum import Decoder, HugeNumber, describe

CHUNK = 1 << 20
RECORD_MAX_CHARS = 64 << 20  # one record bigger than this is a broken file, not a record
OBJECT_MAX_BYTES = 256 << 20
LIST_KEYS = ("data", "rows", "records", "examples", "train", "items", "instances")
_WS = " \t\r\n"


def json_problem(exc: json.JSONDecodeError, text: str) -> str:
    """'truncated JSON (Expecting ',' delimiter at column 31)' or 'invalid JSON (...)'."""
    stripped = text.rstrip()
    truncated = exc.pos >= len(stripped) or exc.msg.startswith("Unterminated string")
    # some messages end in "at" already ("Unterminated string starting at")
    where = f"{exc.msg} column" if exc.msg.endswith(" at") else f"{exc.msg} at column"
    return f"{'truncated' if truncated else 'invalid'} JSON ({where} {exc.colno})"


def iter_json_records(path: Path, display: str, decoder: Decoder | None = None
                      ) -> Iterator[tuple[int, int, object]]:
    """(record number, line number, value) for each record of the file, in order. Integers too
    long to read come out as ``HugeNumber``, counted in ``decoder.seen`` (see ``jsonnum``)."""
    decoder = decoder or Decoder()
    with path.open(encoding="utf-8-sig") as handle:
        head = handle.read(CHUNK)
        stripped = head.lstrip(_WS)
        if stripped.startswith("["):
            yield from _iter_array(handle, head, display, decoder)
            return
        size = path.stat().st_size
        if size > OBJECT_MAX_BYTES:
            raise FormatError(f"a JSON object of {size >> 20} MiB is too big to read whole; "
                              "save the records as JSONL (one object per line) or as a JSON "
                              "array", file=display, code="too_big")
        text = head + handle.read()
    yield from _iter_object(text, display, decoder)


class _Cursor:
    """A read position in a sliding window over the file, with its line number.

    The window is only cut when more text is read, never per record: cutting per record would
    copy the rest of the window each time and make a big array quadratic."""

    def __init__(self, handle, head: str) -> None:
        self.handle, self.buf, self.pos, self.line, self.eof = handle, head, 0, 1, False

    def advance(self, to: int) -> None:
        self.line += self.buf.count("\n", self.pos, to)
        self.pos = to

    def refill(self) -> bool:
        """Read the next chunk; False at the end of the file."""
        if self.eof:
            return False
        more = self.handle.read(CHUNK)
        if not more:  # keep the window as it is: callers may hold offsets into it
            self.eof = True
            return False
        self.buf, self.pos = self.buf[self.pos:] + more, 0
        return True

    def skip_ws(self) -> str:
        """The next non-space character ('' at the end of the file), not consumed."""
        while True:
            p, buf = self.pos, self.buf
            while p < len(buf) and buf[p] in _WS:
                p += 1
            self.advance(p)
            if p < len(buf):
                return buf[p]
            if not self.refill():
                return ""


def _iter_array(handle, head: str, display: str, decoder: Decoder
                ) -> Iterator[tuple[int, int, object]]:
    cur = _Cursor(handle, head)

    def fail(message: str) -> FormatError:
        return FormatError(message, file=display, row=cur.line, unit="line", code="bad_json")

    cur.skip_ws()
    cur.advance(cur.pos + 1)  # the '['
    index = 0
    if cur.skip_ws() == "]":
        cur.advance(cur.pos + 1)
    else:
        while True:
            if not cur.skip_ws():
                raise fail("truncated JSON (the array is never closed with ']')")
            try:
                value, end = decoder.raw_decode(cur.buf, cur.pos)
            except json.JSONDecodeError as exc:
                # Near the window's end (or inside a string) the record may just go on in the
                # next chunk; anywhere else it is a real syntax error.
                unterminated = exc.msg.startswith("Unterminated")
                cut = exc.pos > len(cur.buf) - 64 or unterminated
                if cut and len(cur.buf) - cur.pos < RECORD_MAX_CHARS and cur.refill():
                    continue
                truncated = cur.eof and (unterminated or exc.pos >= len(cur.buf.rstrip()))
                cur.advance(min(exc.pos, len(cur.buf)))
                message = exc.msg.removesuffix(" at")  # the line is named before it
                raise fail(f"{'truncated' if truncated else 'invalid'} JSON ({message})") from None
            except RecursionError:
                raise fail("invalid JSON (nested too deeply)") from None
            if len(cur.buf) - end < 64 and not cur.eof and cur.refill():
                continue  # a number cut by the window's end would read short: parse it again
            index += 1
            cur.skip_ws()
            yield index, cur.line, value
            cur.advance(end)
            sep = cur.skip_ws()
            if sep == "]":
                cur.advance(cur.pos + 1)
                break
            if sep != ",":
                found = repr(sep) if sep else "the end of the file"
                raise fail(f"{'truncated' if not sep else 'invalid'} JSON (expected ',' or ']' "
                           f"after record {index}, found {found})")
            cur.advance(cur.pos + 1)
    if cur.skip_ws():
        raise fail("invalid JSON (extra data after the closing ']')")


def _iter_object(text: str, display: str, decoder: Decoder
                 ) -> Iterator[tuple[int, int, object]]:
    try:
        data = decoder.decode(text)
    except json.JSONDecodeError as exc:
        raise FormatError(json_problem(exc, text), file=display, row=exc.lineno, unit="line",
                          code="bad_json") from None
    except RecursionError:
        raise FormatError("invalid JSON (nested too deeply)", file=display,
                          code="bad_json") from None
    if isinstance(data, list):  # e.g. an array after a comment-free preamble of whitespace
        for i, value in enumerate(data, 1):
            yield i, 0, value
        return
    if not isinstance(data, dict):
        raise FormatError(f"expected a JSON array of records or an object, found "
                          f"{type_name(data)}", file=display, code="bad_shape")
    lists = {k: v for k, v in data.items() if isinstance(v, list)}
    key = next((k for k in LIST_KEYS if lists.get(k) and isinstance(lists[k][0], dict)), None)
    if key is not None:
        for i, value in enumerate(lists[key], 1):
            yield i, 0, value
        return
    chat = any(v and isinstance(v[0], dict) and ("role" in v[0] or "from" in v[0])
               for v in lists.values())
    if data and not chat and len(lists) == len(data) and len({len(v) for v in lists.values()}) == 1:
        names = list(lists)  # the column form: {"instruction": [...], "output": [...]}
        for i, values in enumerate(zip(*lists.values()), 1):
            yield i, 0, dict(zip(names, values))
        return
    yield 1, 1, data  # one record on its own, e.g. {"messages": [...]}


def type_name(value: object) -> str:
    """'a list', 'a number', ... for messages about what was found instead."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, HugeNumber):
        return describe(value)
    return f"a {type(value).__name__}"
