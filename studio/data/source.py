"""A data source read into Arrow (``Source``), the internal column names the readers add, and
the one-line form of a library's error message that data errors quote."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import datasets

from .errors import IssueLog

ROW = "__studio_row"  # the row's number in the user's file (line, record or row)
JSON_COL = "__studio_json"  # a JSON row kept as its text (see readers)
INTERNAL = (ROW, JSON_COL)


@dataclass
class Source:
    """A source read into Arrow: ``dataset`` is memory-mapped; rows that could not be read at
    all (bad JSON, bad bytes, wrong field count) are in ``issues`` with their row numbers."""

    dataset: datasets.Dataset
    file: str
    kind: str  # jsonl, json, csv, tsv, parquet, text, folder, hub
    unit: str = "row"  # how row numbers are counted: line, record or row
    issues: IssueLog = field(default_factory=IssueLog)
    note: str = ""  # why the content overrode the extension, if it did
    columns: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Every row the file holds, including the ones that could not be read."""
        return len(self.dataset) + self.issues.count

    def iter_batches(self, size: int = 1000) -> Iterator[tuple[list[int], list[dict]]]:
        """(row numbers, rows as dicts) a batch at a time: only ``size`` rows in memory."""
        offset = 0
        for batch in self.dataset.iter(batch_size=size):
            n = len(next(iter(batch.values()))) if batch else 0
            numbers = batch[ROW] if ROW in batch else list(range(offset + 1, offset + n + 1))
            if JSON_COL in batch:
                rows = [json.loads(text) for text in batch[JSON_COL]]
            else:
                names = [c for c in batch if c not in INTERNAL]
                rows = [dict(zip(names, values)) for values in zip(*(batch[c] for c in names))]
            offset += n
            yield numbers, rows

    def head(self, n: int = 20) -> list[dict]:
        out: list[dict] = []
        for _, rows in self.iter_batches(min(max(n, 1), 1000)):
            out.extend(rows)
            if len(out) >= n:
                break
        return out[:n]


def short_error(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."
