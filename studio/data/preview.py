"""Look at a source before importing it: its columns, first rows, detected layout and the
first problems, for the Data tab's preview. Reads only the first rows, writes nothing that
outlives the call.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass, field

from studio import config

from .detect import Detection, detect
from .errors import DataError
from .readers import read_source


@dataclass
class Preview:
    file: str
    file_kind: str
    note: str
    columns: list[str]
    rows: list[dict]
    detection: Detection
    problems: list[DataError] = field(default_factory=list)  # among the rows read


def inspect_source(source: str | os.PathLike, *, text_mode: str = "line",
                   sample_rows: int = 1000, head: int = 20) -> Preview:
    """Read the first ``sample_rows`` rows of ``source`` and detect its layout. Raises the same
    typed errors as an import for a file that cannot be read at all."""
    work = config.projects_dir() / ".cache" / f"preview-{uuid.uuid4().hex}"
    try:
        src = read_source(source, work, text_mode=text_mode, max_rows=sample_rows)
        sample = src.head(min(sample_rows, 1000))
        detection = detect(src.columns, sample[:200], source_kind=src.kind)
        preview = Preview(src.file, src.kind, src.note, src.columns, sample[:head], detection,
                          list(src.issues.kept))
        del src
        return preview
    finally:
        shutil.rmtree(work, ignore_errors=True)
