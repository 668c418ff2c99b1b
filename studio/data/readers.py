"""Read any supported source into a memory-mapped ``datasets.Dataset`` (a ``Source``).

Row by row formats (JSONL, JSON, CSV/TSV, text) are parsed here in one streaming pass, in
constant memory, and written in batches to an Arrow file under a work folder the caller owns;
the result is memory-mapped, never a Python list of all rows. This pass is also where broken
lines are found, each with its line number, so a bad line is a row-level problem the user can
drop rather than an unhelpful parser crash.

* JSON/JSONL rows are kept as their JSON text (column ``__studio_json``): users' files mix types
  freely (an ``output`` that is sometimes a number, keys missing from some rows), which a typed
  Arrow schema would reject for the whole file; validation decodes them batch by batch.
* CSV/TSV are read with Python's ``csv`` module, every field as text: type guessing would turn
  "007" into 7 and an empty field into NaN, both wrong for training text.
* Parquet, a ``save_to_disk`` folder and hub datasets go through ``datasets`` itself
  (``hf_readers``).
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import datasets
from datasets.arrow_writer import ArrowWriter

from .errors import DataError, EmptyFileError, FormatError, IssueLog
from .hf_readers import read_folder, read_hub, read_parquet
from .jsonfile import iter_json_records, json_problem, type_name
from .jsonnum import CODE as HUGE, Decoder, huge_number
from .source import INTERNAL, JSON_COL, ROW, Source
from .sniff import bad_utf8_message, check_text_head, file_kind, read_head, scan_utf8, source_kind

TEXT_MODES = ("line", "block")
BATCH_ROWS = 10_000
BATCH_CHARS = 4 << 20  # flush earlier when rows are long, so a batch stays a few MB
BOM = b"\xef\xbb\xbf"
UNITS = {"jsonl": "line", "text": "line", "json": "record"}


def read_source(source: str | os.PathLike, work_dir: Path, *, text_mode: str = "line",
                max_rows: int | None = None) -> Source:
    """Read ``source`` (a file, a saved dataset folder or a hub id). Arrow files go under
    ``work_dir``, which the caller removes when done. ``max_rows`` stops early (previews)."""
    if text_mode not in TEXT_MODES:
        raise ValueError(f"text_mode must be one of {TEXT_MODES}, not {text_mode!r}")
    where, path = source_kind(source)
    work_dir.mkdir(parents=True, exist_ok=True)
    if where == "hub":
        return read_hub(str(source), work_dir)
    assert path is not None
    if where == "folder":
        return read_folder(path)
    display = path.name
    head = read_head(path, display)
    kind, note = file_kind(path, head, display)
    if kind == "parquet":
        if not head:
            raise EmptyFileError("the file is empty (0 bytes)", file=display, code="empty")
        return read_parquet(path, display, work_dir)
    check_text_head(head, display)
    issues = IssueLog()
    if kind == "jsonl":
        sink = ArrowSink(work_dir, datasets.Features({ROW: _INT, JSON_COL: _STR}), "read")
        _read_jsonl(path, display, sink, issues, max_rows)
    elif kind == "json":
        scan_utf8(path, display)  # a bad byte in an array cannot be skipped record by record
        sink = ArrowSink(work_dir, datasets.Features({ROW: _INT, JSON_COL: _STR}), "read")
        _read_json(path, display, sink, issues, max_rows)
    elif kind in ("csv", "tsv"):
        sink = _read_csv(path, display, work_dir, issues, "\t" if kind == "tsv" else ",",
                         max_rows)
    else:
        sink = ArrowSink(work_dir, datasets.Features({ROW: _INT, "text": _STR}), "read")
        _read_text(path, display, sink, issues, text_mode, max_rows)
    dataset = sink.finish()
    if len(dataset) == 0 and issues.count == 0:
        what = {"csv": "a header but no data rows", "tsv": "a header but no data rows",
                "json": "no records (an empty list)"}.get(kind, "only blank lines")
        raise EmptyFileError(f"the file holds {what}", file=display, code="empty")
    src = Source(dataset, display, kind, UNITS.get(kind, "row"), issues, note)
    src.columns = _columns(src)
    return src


_INT, _STR = datasets.Value("int64"), datasets.Value("string")


class ArrowSink:
    """Rows appended one at a time, written to an Arrow file in batches, then memory-mapped."""

    def __init__(self, work_dir: Path, features: datasets.Features, stage: str,
                 batch_rows: int = BATCH_ROWS) -> None:
        self.path = work_dir / f"{stage}-{uuid.uuid4().hex}.arrow"
        self.batch_rows = batch_rows
        self.features = features
        self.writer = ArrowWriter(features=features, path=str(self.path))
        self.columns: dict[str, list] = {name: [] for name in features}
        self.pending = self.chars = self.count = 0

    def add(self, row: dict, chars: int = 0) -> None:
        for name, values in self.columns.items():
            values.append(row.get(name))
        self.pending += 1
        self.count += 1
        self.chars += chars
        if self.pending >= self.batch_rows or self.chars >= BATCH_CHARS:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.writer.write_batch(self.columns)
            self.columns = {name: [] for name in self.columns}
            self.pending = self.chars = 0

    def finish(self) -> datasets.Dataset:
        self.flush()
        self.writer.finalize()
        self.writer.close()
        return datasets.Dataset.from_file(str(self.path))


def _bad_line(issues: IssueLog, display: str, line: int, message: str, code: str) -> None:
    issues.add(DataError(message, file=display, row=line, unit="line", code=code))


def _raw_lines(handle, split_cr: bool) -> Iterator[bytes]:
    """Byte lines ending in \n, or also in a lone \r (old Mac files, Excel's "CSV (Macintosh)")
    when ``split_cr``: otherwise a whole such file would be one line."""
    for raw in handle:
        if split_cr and b"\r" in raw[:-2]:
            yield from (part for part in _LONE_CR.split(raw) if part)
        else:
            yield raw


_LONE_CR = re.compile(rb"(?<=\r)(?!\n)")


def _lines(path: Path, display: str, issues: IssueLog | None,
           bad: dict[int, str] | None = None, split_cr: bool = False
           ) -> Iterator[tuple[int, str | None]]:
    """(line number, text) for each line, read as bytes so a bad byte costs one line, not the
    file. A line that is not UTF-8 yields None and is logged (or, for CSV, noted in ``bad``
    and yielded with replacement characters so the record structure survives)."""
    offset = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(_raw_lines(handle, split_cr), 1):
            start = offset
            offset += len(raw)
            if number == 1 and raw.startswith(BOM):
                raw, start = raw[len(BOM):], start + len(BOM)
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                message = bad_utf8_message(raw[exc.start], start + exc.start)
                if bad is not None:
                    bad[number] = bad_utf8_message(raw[exc.start], start + exc.start, number)
                    yield number, raw.decode("utf-8", errors="replace")
                else:
                    assert issues is not None
                    _bad_line(issues, display, number, message, "bad_utf8")
                    yield number, None


def _read_jsonl(path: Path, display: str, sink: ArrowSink, issues: IssueLog,
                max_rows: int | None) -> None:
    decoder = Decoder()
    for number, text in _lines(path, display, issues):
        if text is None or not text.strip():
            continue
        text = text.rstrip("\r\n")  # so a truncated line's error column is on this line
        try:
            value = decoder.decode(text)
        except json.JSONDecodeError as exc:
            _bad_line(issues, display, number, json_problem(exc, text), "bad_json")
            continue
        except RecursionError:
            _bad_line(issues, display, number, "invalid JSON (nested too deeply)", "bad_json")
            continue
        if not isinstance(value, dict):
            _bad_line(issues, display, number, f"expected a JSON object ({{...}}) but found "
                      f"{type_name(value)}", "not_object")
            continue
        if decoder.seen and (huge := huge_number(value)):  # walked only once the file has one
            issues.add(DataError(huge[1], file=display, row=number, field=huge[0], unit="line",
                                 code=HUGE))
            continue
        text = text.strip()
        sink.add({ROW: number, JSON_COL: text}, len(text))
        if max_rows is not None and sink.count >= max_rows:
            return


def _read_json(path: Path, display: str, sink: ArrowSink, issues: IssueLog,
               max_rows: int | None) -> None:
    decoder = Decoder()
    for number, _line, value in iter_json_records(path, display, decoder):
        problem, code, field = None, "not_object", None
        if not isinstance(value, dict):
            problem = f"expected a JSON object ({{...}}) but found {type_name(value)}"
        elif decoder.seen and (huge := huge_number(value)):
            (field, problem), code = huge, HUGE
        else:
            try:  # ASCII escapes keep unpaired surrogates storable; they fail in validation
                text = json.dumps(value)
            except (RecursionError, ValueError):
                problem = "the record is nested too deeply"
        if problem:
            issues.add(DataError(problem, file=display, row=number, field=field,
                                 unit="record", code=code))
            continue
        sink.add({ROW: number, JSON_COL: text}, len(text))
        if max_rows is not None and sink.count >= max_rows:
            return


def _read_csv(path: Path, display: str, work_dir: Path, issues: IssueLog, delimiter: str,
              max_rows: int | None) -> ArrowSink:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long answers exceed the 128 KB default
    bad: dict[int, str] = {}
    lines = _lines(path, display, None, bad, split_cr=True)
    reader = csv.reader((text for _, text in lines), delimiter=delimiter)
    try:
        header = next((rec for rec in reader if any(f.strip() for f in rec)), None)
        if header is None:
            raise EmptyFileError("the file is empty (no header row)", file=display, code="empty")
        header = [name.strip() or f"column_{i}" for i, name in enumerate(header, 1)]
        dupes = sorted({n for n in header if header.count(n) > 1})
        if dupes:
            raise FormatError(f"the header names column {dupes[0]!r} more than once; give "
                              "every column a different name", file=display, code="bad_header")
        sink = ArrowSink(work_dir, datasets.Features({ROW: _INT, **{n: _STR for n in header}}),
                         "read")
        number, last = 0, reader.line_num
        for record in reader:
            first, last = last + 1, reader.line_num
            if not any(f.strip() for f in record) and len(record) <= 1:
                continue  # a blank line, not a row
            number += 1
            broken = [bad.pop(n) for n in range(first, last + 1) if n in bad]
            if broken:
                issues.add(DataError(broken[0], file=display, row=number, code="bad_utf8"))
            elif len(record) != len(header):
                issues.add(DataError(_field_count(header, record, first, last, delimiter),
                                     file=display, row=number, code="field_count"))
            else:
                sink.add({ROW: number, **dict(zip(header, record))}, sum(map(len, record)))
                if max_rows is not None and sink.count >= max_rows:
                    break
    except csv.Error as exc:
        name = "TSV" if delimiter == "\t" else "CSV"
        raise FormatError(f"cannot parse the file as {name} near line {reader.line_num} "
                          f"({exc})", file=display,
                          code="bad_csv") from None
    return sink


def _field_count(header: list[str], record: list[str], first: int, last: int,
                 delimiter: str) -> str:
    names = ", ".join(header[:8]) + (", ..." if len(header) > 8 else "")
    message = f"expected {len(header)} fields ({names}) but found {len(record)}"
    if len(record) > len(header):
        sep = "a tab" if delimiter == "\t" else "a comma"
        return message + f"; a field that contains {sep} must be inside double quotes"
    if last > first:
        return message + (f" (the row spans lines {first}-{last}: a quoted field may be "
                          "missing its closing quote)")
    return message


def _read_text(path: Path, display: str, sink: ArrowSink, issues: IssueLog, mode: str,
               max_rows: int | None) -> None:
    block: list[str] = []
    start, broken = 0, False

    def flush() -> None:
        if block and not broken:
            text = "\n".join(block)
            sink.add({ROW: start, "text": text}, len(text))

    for number, text in _lines(path, display, issues, split_cr=True):
        if mode == "line":
            if text is not None and text.strip():
                text = text.rstrip("\r\n")
                sink.add({ROW: number, "text": text}, len(text))
        elif text is not None and not text.strip():
            flush()  # a blank line ends a block
            block, broken = [], False
        else:
            if not block and not broken:
                start = number
            broken = broken or text is None  # the bad line is logged; drop its block
            block.append((text or "").rstrip("\r\n"))
        if max_rows is not None and sink.count >= max_rows:
            return
    flush()


def _columns(src: Source) -> list[str]:
    """Column names; for JSON rows, the keys seen in the first 1,000 rows, in first-seen order."""
    if JSON_COL not in src.dataset.column_names:
        return [c for c in src.dataset.column_names if c not in INTERNAL]
    seen: dict[str, None] = {}
    for row in src.head(1000):
        seen.update(dict.fromkeys(row))
    return list(seen)
