"""Validate a read source row by row and write its canonical form, in one batched pass.

Rows go through ``normalize.convert_row`` a batch at a time (never all rows as Python objects);
the usable ones are written to a memory-mapped Arrow file, the others are counted and reported
with their row numbers. The result is a ``ValidationReport`` plus the canonical dataset.

Policies:

* ``on_invalid="drop"``: invalid rows are left out and listed in the report;
  ``"refuse"``: any invalid row raises ``ValidationError`` carrying the report.
  No usable row at all raises under either policy.
* Rows longer than ``max_tokens`` are warned about; ``on_long`` picks what happens to them:
  ``"keep"`` (default), ``"drop"``, or ``"truncate"`` (kept whole here and recorded, so the
  tokenizer cuts them at training time: only it knows where the token boundary falls).
* Duplicates (identical canonical examples) are a warning, not an error: repeating an example
  can be deliberate. The report counts them and names the first few.

Token lengths come from ``token_counter(list_of_texts) -> list_of_ints`` when given; otherwise
they are estimated as characters / 4, and the report says so.
"""

from __future__ import annotations

import hashlib
import json
import math
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc

from .detect import KINDS
from .errors import DataError, IssueLog, ValidationError
from .normalize import convert_row, length_text
from .readers import ROW, ArrowSink, Source

HASH = "__studio_hash"
CHARS_PER_TOKEN = 4
BATCH = 1000
ON_INVALID = ("drop", "refuse")
ON_LONG = ("keep", "drop", "truncate")
MESSAGE = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
FEATURES = {"chat": datasets.Features({"messages": MESSAGE}),
            "text": datasets.Features({"text": datasets.Value("string")})}


def counted(n: int, noun: str) -> str:
    """"1 invalid row", "3 invalid rows": a count with its noun in the right number."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


@dataclass
class Notice:
    """A warning about many rows at once: what, how many, and the first few row numbers."""

    code: str
    message: str
    count: int = 0
    rows: list[int] = field(default_factory=list)

    def add(self, row: int) -> None:
        self.count += 1
        if len(self.rows) < 10:
            self.rows.append(row)


@dataclass
class ValidationReport:
    """Everything validation found. ``ok_rows`` holds the 0-based positions (in the source
    dataset) of the rows that made it into the canonical dataset."""

    file: str
    unit: str
    format: str
    kind: str
    policy: str = "drop"
    total_rows: int = 0
    ok_count: int = 0
    invalid_rows: int = 0
    dropped_long: int = 0
    duplicates: int = 0
    max_tokens: int | None = None
    on_long: str = "keep"
    length_method: str = ""
    errors: IssueLog = field(default_factory=IssueLog)
    warnings: dict[str, Notice] = field(default_factory=dict)
    ok_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    note: str = ""

    @property
    def error_count(self) -> int:
        return self.errors.count

    def warn(self, code: str, message: str, row: int) -> None:
        self.warnings.setdefault(code, Notice(code, message)).add(row)

    def _rows(self, rows: list[int], count: int) -> str:
        shown = ", ".join(str(r) for r in rows[:5])
        more = f" and {count - min(count, 5)} more" if count > 5 else ""
        return f"{self.unit}s {shown}{more}" if count > 1 else f"{self.unit} {shown}"

    def summary(self) -> str:
        """The report in a few lines a person can read."""
        dropped = self.invalid_rows + self.dropped_long
        lines = [f"{self.file}: {self.total_rows:,} rows read, {self.ok_count:,} usable"
                 + (f", {dropped:,} left out" if dropped else "")
                 + f" (format {self.format}, kind {self.kind})."]
        if self.unit == "row" and self.note:
            lines.append(self.note)
        if self.errors.count:
            lines.append(f"{counted(self.invalid_rows, 'invalid row')} ({counted(self.errors.count, 'problem')}):")
            for code, count in sorted(self.errors.by_code.items(), key=lambda kv: -kv[1]):
                rows = self.errors.rows_by_code.get(code, [])
                lines.append(f"  - {count:,} x {code.replace('_', ' ')} "
                             f"({self._rows(rows, count)}), e.g. {self.errors.text_by_code[code]}")
        for notice in self.warnings.values():
            lines.append(f"Warning: {notice.message} ({self._rows(notice.rows, notice.count)})")
        return "\n".join(lines)

    def to_dict(self, max_errors: int = 100) -> dict[str, Any]:
        return {
            "file": self.file, "unit": self.unit, "format": self.format, "kind": self.kind,
            "policy": self.policy, "total_rows": self.total_rows, "ok_rows": self.ok_count,
            "invalid_rows": self.invalid_rows, "dropped_long": self.dropped_long,
            "duplicates": self.duplicates, "max_tokens": self.max_tokens,
            "on_long": self.on_long, "length_method": self.length_method,
            "error_count": self.errors.count, "errors_by_code": dict(self.errors.by_code),
            "dropped": [e.to_dict() for e in self.errors.kept[:max_errors]],
            "warnings": [{"code": n.code, "message": n.message, "count": n.count,
                          "rows": n.rows} for n in self.warnings.values()],
            "summary": self.summary(),
        }


def estimate_tokens(texts: list[str]) -> list[int]:
    """A tokenizer-free estimate: about four characters per token for English text."""
    return [math.ceil(len(t) / CHARS_PER_TOKEN) for t in texts]


def validate(source: Source, fmt: str, mapping: dict[str, str], work_dir: Path, *,
             on_invalid: str = "drop", max_tokens: int | None = None,
             token_counter: Callable[[list[str]], list[int]] | None = None,
             on_long: str = "keep") -> tuple[ValidationReport, datasets.Dataset]:
    """Validate every row of ``source`` and write the usable ones in canonical form.

    The returned dataset has the canonical column (``messages`` or ``text``) plus the source
    row number (``__studio_row``) and a content hash (``__studio_hash``) used for duplicates."""
    if on_invalid not in ON_INVALID:
        raise ValueError(f"on_invalid must be one of {ON_INVALID}, not {on_invalid!r}")
    if on_long not in ON_LONG:
        raise ValueError(f"on_long must be one of {ON_LONG}, not {on_long!r}")
    kind = KINDS[fmt]
    report = ValidationReport(source.file, source.unit, fmt, kind, on_invalid,
                              max_tokens=max_tokens, on_long=on_long)
    report.length_method = ("counted with the model's tokenizer" if token_counter else
                            f"estimated as characters / {CHARS_PER_TOKEN} (no tokenizer given)")
    if source.kind == "csv" or source.kind == "tsv":
        report.note = ("Row numbers count data rows: row 1 is the first row under the header.")
    counter = token_counter or estimate_tokens
    features = datasets.Features({**FEATURES[kind], ROW: datasets.Value("int64"),
                                  HASH: datasets.Value("int64")})
    # canonical rows are nested dicts, heavier than the text they came from: smaller batches
    sink = ArrowSink(work_dir, features, "canonical", batch_rows=BATCH)
    kept_positions = array("q")
    position = 0
    for numbers, rows in source.iter_batches(BATCH):
        batch: list[tuple[int, int, dict]] = []
        for number, row in zip(numbers, rows):
            example, errors, warnings = convert_row(row, fmt, mapping)
            for code, column, message in warnings:
                report.warn(code, _WARNINGS.get(code, message), number)
            if errors:
                report.invalid_rows += 1
                for code, column, message in errors:
                    report.errors.add(DataError(message, file=source.file, row=number,
                                                field=column, unit=source.unit, code=code))
            else:
                batch.append((position, number, example))
            position += 1
        if not batch:
            continue
        texts = [length_text(ex) for _, _, ex in batch]
        lengths = _lengths(texts, counter)
        for (pos, number, example), text, length in zip(batch, texts, lengths):
            if max_tokens is not None and length > max_tokens:
                report.warn("too_long", f"rows longer than {max_tokens} tokens ("
                            f"{report.length_method}); {_LONG[on_long]}", number)
                if on_long == "drop":
                    report.dropped_long += 1
                    continue
            sink.add({**example, ROW: number, HASH: _digest(example)}, len(text))
            kept_positions.append(pos)
    canonical = sink.finish()
    report.errors.extend(source.issues)  # lines that could not even be read
    report.invalid_rows += source.issues.count
    report.total_rows = source.total
    report.ok_count = len(canonical)
    report.ok_rows = np.frombuffer(kept_positions, dtype=np.int64).copy()
    _duplicates(canonical, report)
    if report.ok_count == 0:
        first = report.errors.kept[0] if report.errors.kept else None
        why = f"; first problem: {first}" if first else ""
        raise ValidationError(f"no usable rows ({report.total_rows:,} read, all left out){why}",
                              report=report, file=source.file, code="no_rows")
    if on_invalid == "refuse" and report.errors.count:
        first = report.errors.kept[0]
        raise ValidationError(
            f"{first.message} ({counted(report.invalid_rows, 'invalid row')} in all; nothing was "
            "imported: fix them, or import with on_invalid='drop' to leave them out)",
            report=report, file=first.file, row=first.row, field=first.field, unit=first.unit,
            code=first.code)
    return report, canonical


_WARNINGS = {"coerced": "numbers or true/false were used as text (e.g. 5 became \"5\")"}
_LONG = {"keep": "kept whole", "drop": "left out",
         "truncate": "kept; they will be cut to the limit when tokenized"}


def _lengths(texts: list[str], counter: Callable[[list[str]], list[int]]) -> list[int]:
    lengths = list(counter(texts))
    if len(lengths) != len(texts):
        raise ValueError(f"token_counter returned {len(lengths)} lengths for {len(texts)} texts")
    return [int(n) for n in lengths]


def _digest(example: dict) -> int:
    """A 64-bit hash of the canonical example: duplicates are found on these, in Arrow."""
    data = json.dumps(example, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def _duplicates(canonical: datasets.Dataset, report: ValidationReport) -> None:
    """Count repeated examples with Arrow's hash aggregation (8 bytes a row, not Python sets)
    and name the first few repeats: 'line 9 repeats line 2'."""
    if len(canonical) < 2:
        return
    table = canonical.data.table.select([HASH, ROW])
    groups = table.group_by(HASH).aggregate([(ROW, "count"), (ROW, "min")])
    repeated = groups.filter(pc.greater(groups[f"{ROW}_count"], 1))
    if repeated.num_rows == 0:
        return
    report.duplicates = pc.sum(repeated[f"{ROW}_count"]).as_py() - repeated.num_rows
    joined = table.join(repeated.select([HASH, f"{ROW}_min"]), HASH)
    repeats = joined.filter(pc.not_equal(joined[ROW], joined[f"{ROW}_min"]))
    first = repeats.sort_by(ROW).slice(0, 5).to_pylist()
    pairs = ", ".join(f"{report.unit} {r[ROW]} repeats {report.unit} {r[f'{ROW}_min']}"
                      for r in first)
    notice = Notice("duplicates", f"{report.duplicates:,} duplicate rows ({repeated.num_rows:,} "
                    f"examples appear more than once; kept, since repeats can be deliberate): "
                    f"{pairs}", report.duplicates, [r[ROW] for r in first])
    report.warnings["duplicates"] = notice
