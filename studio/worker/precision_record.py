"""The precision a run trained in, and why, kept with the run: written by the worker, read by the
Train tab. Imports no torch (the UI reads it).

Where: ``precision.json`` in the run's folder (beside ``runspec.json``) plus a line in its log.
Not a metric: metrics are numbers per step and the reason is text. Not a column of ``runs``: one
line of text is no reason for a schema migration, and the file lives and dies with the run's folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RECORD_NAME = "precision.json"


def record(folder: Path, decision: dict[str, Any]) -> None:
    """Write the decision (``precision.Decision.as_dict``) and say it in the run's log."""
    (Path(folder) / RECORD_NAME).write_text(json.dumps(decision, indent=1), encoding="utf-8")
    print(describe(decision), flush=True)


def read_record(folder: Path) -> dict[str, Any] | None:
    """The run's recorded decision, or None (a run from before issue 13, or not started yet)."""
    try:
        value = json.loads((Path(folder) / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def describe(decision: dict[str, Any]) -> str:
    """One line: "precision bf16: measured: a bf16 training step is 1.62× as fast ..."."""
    return (f"precision {decision.get('precision')}: {decision.get('reason')}"
            + (" (cached)" if decision.get("cached") else "")
            + (f"; {decision['attention']} attention" if decision.get("attention") else ""))
