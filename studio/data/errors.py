"""Typed errors for importing data (the only exceptions bad input may raise out of
``studio.data``), and the bounded log that collects row-level ones.

Every error names the file, the row (as a person counts it) and the field, so the Data tab can
show a message the user can act on, e.g.::

    train.csv, row 12, field 'output': empty value (expected non-empty text)

Row numbers are 1-based and mean what the user would look for in their editor:

* JSONL and plain text: the physical line number (``unit="line"``), blank lines included;
* CSV/TSV: the data row number, the header not counted (row 1 is the first row under the
  header), blank lines skipped; a quoted field with embedded newlines is still one row;
* a JSON array: the record's position in the array (``unit="record"``);
* Parquet, a saved ``datasets`` folder or a hub dataset: the row's position (``unit="row"``).

Row-level problems found while reading or validating are ``DataError`` instances too (with a
short ``code`` such as ``"bad_json"``), collected in a report instead of raised one by one.
"""

from __future__ import annotations

from typing import Any


class DataError(Exception):
    """A problem with the user's data: where it is, and what is wrong in plain words."""

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None,
                 field: str | None = None, unit: str = "row", code: str = "error") -> None:
        self.message = message
        self.file = file
        self.row = row
        self.field = field
        self.unit = unit
        self.code = code
        super().__init__(self.render())

    def where(self) -> str:
        """"train.csv, row 12, field 'output'" (the parts that are known)."""
        parts = []
        if self.file:
            parts.append(self.file)
        if self.row is not None:
            parts.append(f"{self.unit} {self.row}")
        if self.field is not None:
            parts.append(f"field {self.field!r}")
        return ", ".join(parts)

    def render(self) -> str:
        where = self.where()
        return f"{where}: {self.message}" if where else self.message

    def __str__(self) -> str:
        return self.render()

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form, for ``meta.json`` and the UI."""
        return {"file": self.file, "unit": self.unit, "row": self.row, "field": self.field,
                "code": self.code, "message": self.message, "text": self.render()}

    def __reduce__(self):  # keyword-only fields: pickle (e.g. across processes) needs help
        return (_rebuild, (type(self), self.to_dict()))


def _rebuild(cls: type, data: dict[str, Any]) -> DataError:
    err = cls.__new__(cls)
    DataError.__init__(err, data["message"], file=data["file"], row=data["row"],
                       field=data["field"], unit=data["unit"], code=data["code"])
    if isinstance(err, ValidationError):
        err.report = None
    return err


class UnreadableFileError(DataError):
    """The source cannot be read at all: missing, binary, not UTF-8, unreachable."""


class EmptyFileError(UnreadableFileError):
    """The file exists but holds no data (0 bytes, only whitespace, or a header alone)."""


class FormatError(DataError):
    """The file reads, but its structure is not what the chosen format needs (columns,
    mapping, top-level JSON shape)."""


class ValidationError(DataError):
    """Rows failed validation and the policy was ``on_invalid="refuse"``, or no row was
    usable at all. ``report`` holds every problem found (a ``ValidationReport``)."""

    def __init__(self, message: str, *, report: Any = None, **where: Any) -> None:
        self.report = report
        super().__init__(message, **where)

    def __reduce__(self):  # the report stays behind; its text is in the message
        return (_rebuild, (type(self), self.to_dict()))





class IssueLog:
    """Row-level problems of one kind (errors or warnings) found in a pass over a file.

    A million-row file can have a million bad rows, so only the first ``keep`` are kept whole;
    every problem is still counted, by code, with the first few row numbers of each code.
    """

    def __init__(self, keep: int = 100, rows_per_code: int = 10) -> None:
        self.keep, self.rows_per_code = keep, rows_per_code
        self.kept: list[DataError] = []
        self.count = 0
        self.by_code: dict[str, int] = {}
        self.rows_by_code: dict[str, list[int]] = {}
        self.text_by_code: dict[str, str] = {}  # the first message of each code, for summaries

    def add(self, err: DataError) -> None:
        self.count += 1
        if len(self.kept) < self.keep:
            self.kept.append(err)
        self.by_code[err.code] = self.by_code.get(err.code, 0) + 1
        rows = self.rows_by_code.setdefault(err.code, [])
        if len(rows) < self.rows_per_code and err.row is not None and err.row not in rows[-1:]:
            rows.append(err.row)  # two problems on one row name the row once
        self.text_by_code.setdefault(err.code, err.render())

    def extend(self, other: IssueLog) -> None:
        """Merge another log (read-time problems into the validation report)."""
        for err in other.kept:
            if len(self.kept) < self.keep:
                self.kept.append(err)
        self.kept.sort(key=lambda e: (e.file or "", e.row if e.row is not None else -1))
        self.count += other.count
        for code, n in other.by_code.items():
            self.by_code[code] = self.by_code.get(code, 0) + n
            rows = sorted(self.rows_by_code.get(code, []) + other.rows_by_code.get(code, []))
            self.rows_by_code[code] = rows[: self.rows_per_code]
            self.text_by_code.setdefault(code, other.text_by_code.get(code, ""))


__all__ = ["DataError", "EmptyFileError", "FormatError", "IssueLog", "UnreadableFileError",
           "ValidationError"]
