"""Importing a user's dataset: the Data tab's engine.

A file the user made (JSONL, JSON, CSV/TSV, Parquet, plain text, a ``save_to_disk`` folder, or a
hub id when online) is read in streaming fashion, its layout detected (or given), validated row
by row with messages a person can act on, and stored in one canonical format::

    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}   # kind "chat"
    {"text": str}                                                               # kind "text"

under ``projects/<project>/datasets/<slug>-<hash8>/{train,eval,meta.json}`` with a row in the
``datasets`` table. Bad input only ever raises ``DataError`` subclasses.

Modules: ``errors`` (typed errors), ``sniff`` (file kind, binary/encoding checks), ``readers``
and ``jsonfile`` (reading into Arrow), ``jsonnum`` (integers too long to read, named per row),
``detect`` (layout detection), ``normalize`` (one row to canonical), ``validate`` (the batched
pass and its report), ``store`` (import, storage, loading), ``preview`` (a look before
importing).

The names below load lazily (PEP 562): ``import studio.data.tokenize`` must not pay for
importing ``datasets`` and pyarrow, which the studio only imports when used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "detect": ("FORMATS", "KINDS", "Candidate", "Detection", "detect"),
    "errors": ("DataError", "EmptyFileError", "FormatError", "UnreadableFileError",
               "ValidationError"),
    "preview": ("Preview", "inspect_source"),
    "readers": ("Source", "read_source"),
    "store": ("ImportResult", "content_hash", "dataset_dir", "import_dataset",
              "import_sample_task", "load_dataset_split"),
    "validate": ("ValidationReport", "estimate_tokens", "validate"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
