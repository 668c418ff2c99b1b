"""Decide what kind of source the user gave (JSONL, JSON, CSV, ... or a hub id) before parsing it.

The extension decides first; the content settles the usual ambiguities (a ``.json`` file that
holds one object per line, a pretty-printed array saved as ``.jsonl``, JSON lines saved as
``.txt``). The cheap checks here (missing, empty, binary, wrong encoding) exist because a parser
would fail on those cases with a message nobody can act on.
"""

from __future__ import annotations

import codecs
import os
import re
from pathlib import Path

from .errors import EmptyFileError, FormatError, UnreadableFileError
from .jsonnum import Decoder

EXTENSIONS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
    ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet", ".txt": "text", ".text": "text",
}
SUPPORTED = (".jsonl, .json, .csv, .tsv, .parquet, .txt, a folder saved with save_to_disk, "
             "or a hub id")
HEAD_BYTES = 64 * 1024

# Files people export by mistake. Naming what the file really is beats "invalid JSON at line 1".
MAGIC = [
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"), (b"GIF89a", "a GIF image"),
    (b"%PDF-", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive (Excel .xlsx files are ZIP archives: export the sheet as CSV "
                    "UTF-8)"),
    (b"\xd0\xcf\x11\xe0", "an old Office document (.xls/.doc): export it as CSV UTF-8"),
    (b"\x1f\x8b", "a gzip-compressed file: decompress it first"),
    (b"PAR1", "a Parquet file: give it the .parquet extension"),
    (b"SQLite format 3\x00", "an SQLite database"),
    (b"\xff\xfe", "UTF-16 text (Windows 'Unicode'): save it as UTF-8"),
    (b"\xfe\xff", "UTF-16 text: save it as UTF-8"),
]
BINARY_SHARE = 0.05  # this share of undecodable bytes at the start means "not text at all"
HUB_ID = re.compile(r"^(?:hf://datasets/)?([A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def source_kind(source: str | os.PathLike) -> tuple[str, Path | None]:
    """("file" | "folder", path) for something on disk, ("hub", None) for a hub dataset id.

    A string that names nothing on disk is a hub id only if it looks like one and not like a
    path the user mistyped; otherwise the error says the file was not found.
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return "folder", path
    if path.exists():
        return "file", path
    looks_like_path = (isinstance(source, Path) or text.startswith(("/", ".", "~"))
                       or "\\" in text or path.suffix.lower() in EXTENSIONS)
    if not looks_like_path and HUB_ID.match(text):
        return "hub", None
    raise UnreadableFileError("file not found (check the path; supported sources: "
                              f"{SUPPORTED})", file=path.name or text, code="not_found")


def read_head(path: Path, display: str) -> bytes:
    try:
        with path.open("rb") as handle:
            return handle.read(HEAD_BYTES)
    except OSError as exc:
        raise UnreadableFileError(f"cannot open the file ({exc.strerror or exc})", file=display,
                                  code="unreadable") from None


def check_text_head(head: bytes, display: str) -> None:
    """Refuse, with the reason, files that are empty, binary, or not text at all."""
    if not head:
        raise EmptyFileError("the file is empty (0 bytes)", file=display, code="empty")
    for magic, what in MAGIC:
        if head.startswith(magic):
            raise UnreadableFileError(f"this is not a text file: it looks like {what}",
                                      file=display, code="binary")
    if head.startswith(codecs.BOM_UTF8):
        head = head[len(codecs.BOM_UTF8):]
    if not head.strip():
        raise EmptyFileError("the file is empty (only whitespace)", file=display, code="empty")
    nul = head.find(b"\x00")
    if nul >= 0:
        line = head.count(b"\n", 0, nul) + 1
        raise UnreadableFileError(f"this looks like a binary file, not text (a NUL byte at line "
                                  f"{line}, byte offset {nul})", file=display, code="binary")
    decoded = head.decode("utf-8", errors="replace")
    bad = decoded.count("\ufffd") - head.decode("utf-8", errors="ignore").count("\ufffd")
    if bad > max(1, BINARY_SHARE * len(head)):
        offset = first_bad_byte(head)
        line = head.count(b"\n", 0, offset) + 1
        raise UnreadableFileError(
            f"this looks like a binary file, not UTF-8 text (first bad byte "
            f"0x{head[offset]:02x} at line {line}, byte offset {offset})",
            file=display, code="binary")


def first_bad_byte(data: bytes) -> int:
    """The offset of the first byte that is not valid UTF-8 (``len(data)`` if none)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start
    return len(data)


def bad_utf8_message(byte: int, offset: int, line: int | None = None) -> str:
    at = f"line {line}, " if line is not None else ""
    return (f"not valid UTF-8 (byte 0x{byte:02x} at {at}byte offset {offset}); save the file "
            "as UTF-8 (in Excel: 'CSV UTF-8')")


def scan_utf8(path: Path, display: str, chunk: int = 1 << 20) -> None:
    """Stream the whole file once and raise at the first byte that is not UTF-8, naming its
    line and byte offset (for formats whose rows cannot be skipped one by one, like a JSON
    array). Constant memory."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with path.open("rb") as handle:
        while True:
            data = handle.read(chunk)
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as exc:
                # exc.start counts from the bytes the decoder held back plus this chunk
                held = len(exc.object) - len(data)
                bad = offset - held + exc.start
                line += exc.object.count(b"\n", held, max(held, exc.start))
                raise UnreadableFileError(bad_utf8_message(exc.object[exc.start], bad, line),
                                          file=display, code="bad_utf8") from None
            if not data:
                return
            offset += len(data)
            line += data.count(b"\n")


def _first_line(head: bytes) -> tuple[str, bool]:
    """The first non-blank line of the head, and whether more non-blank lines follow it."""
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return (lines[0].strip() if lines else ""), len(lines) > 1


def _parses_as_object(line: str) -> bool:
    try:
        return isinstance(Decoder().decode(line), dict)  # a too-long number is still JSON
    except (ValueError, RecursionError):
        return False


def file_kind(path: Path, head: bytes, display: str) -> tuple[str, str]:
    """(kind, note): kind is one of jsonl, json, csv, tsv, parquet, text; the note says why
    when the content overrode the extension (shown to the user as evidence)."""
    ext = path.suffix.lower()
    kind = EXTENSIONS.get(ext)
    if kind == "parquet":
        return kind, ""
    first, more = _first_line(head)
    if kind == "json" and first.startswith("{") and more and _parses_as_object(first):
        return "jsonl", f"the {ext} file holds one JSON object per line, so it is read as JSONL"
    if kind == "jsonl" and first.startswith("[") and not _is_json(first):
        return "json", f"the {ext} file holds one JSON array, so it is read as JSON"
    if kind == "text":
        sample = [ln for ln in head.decode("utf-8", "replace").splitlines() if ln.strip()][:5]
        if len(sample) > 1 and all(_parses_as_object(ln) for ln in sample[:-1]):
            return "jsonl", f"the {ext} file holds one JSON object per line, so it is read as JSONL"
    if kind is not None:
        return kind, ""
    if first.startswith("["):
        return "json", "the content is a JSON array"
    if first.startswith("{"):
        return ("jsonl", "the content is one JSON object per line") if more and \
            _parses_as_object(first) else ("json", "the content is a JSON object")
    raise FormatError(f"unsupported file type {ext or '(no extension)'!r}; supported: "
                      f"{SUPPORTED}", file=display, code="unsupported")


def _is_json(line: str) -> bool:
    try:
        Decoder().decode(line)
    except (ValueError, RecursionError):
        return False
    return True
