"""The bake-off table: one row per method, every figure read from the runs' recorded metrics.

``build_rows`` reads the history (no torch); ``refresh`` saves the rows into the bake-off so the
table stays with the project; ``to_csv`` / ``to_markdown`` export it; ``scatter_points`` gives
quality against trainable parameters for the plot. A figure that was not measured is None
(shown as "—"), never a guess.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any

from studio.db import Bakeoff, Database
from studio.methods import get_method

MIB = 2**20  # sizes in MiB, as History and the estimates show them

# (key, header) in display order; the keys are the saved JSON's keys too.
COLUMNS = [
    ("method", "method"),
    ("status", "status"),
    ("trainable_params", "trainable parameters"),
    ("adapter_mb", "adapter file (MiB)"),
    ("peak_memory_mb", "peak memory (MiB)"),
    ("peak_memory_kind", "peak memory is"),
    ("train_s", "train time (s)"),
    ("train_tokens_per_s", "train tokens/s"),
    ("eval_loss", "final eval loss"),
    ("exact_match", "eval exact match"),
    ("infer_tokens_per_s", "inference tokens/s"),
    ("inference", "inference with"),
    ("mergeable", "mergeable"),
]
# Columns that a completed run must have measured (the rest describe the run or the method).
MEASURED = ["trainable_params", "adapter_mb", "peak_memory_mb", "train_s", "train_tokens_per_s",
            "eval_loss", "exact_match", "infer_tokens_per_s"]

METRICS = ["trainable_params", "adapter_bytes", "peak_rss_bytes", "peak_cuda_allocated_bytes",
           "train_seconds", "train_tokens_per_s", "eval_loss", "eval_exact_match",
           "inference_tokens_per_s", "inference_merged"]


def _last_values(db: Database, run_id: int) -> dict[str, float]:
    """The latest value of each metric (the final step's, for the end-of-run figures)."""
    values: dict[str, float] = {}
    for m in db.metrics_for(run_id, METRICS):  # ordered by step: later steps overwrite
        if m.value is not None and not (isinstance(m.value, float) and math.isnan(m.value)):
            values[m.name] = m.value
    return values


def run_row(db: Database, method: str, run_id: int, note: str | None = None) -> dict[str, Any]:
    spec = get_method(method)
    run = db.get_run(run_id)
    v = _last_values(db, run_id) if run is not None else {}
    cuda = v.get("peak_cuda_allocated_bytes")
    peak = cuda if cuda is not None else v.get("peak_rss_bytes")
    merged = v.get("inference_merged")
    status = run.status if run is not None else "deleted"
    return {
        "method": spec.title, "method_name": method, "run_id": run_id, "status": status,
        "trainable_params": int(v["trainable_params"]) if "trainable_params" in v else None,
        "adapter_mb": _round(v.get("adapter_bytes"), MIB, 3),  # MiB, as History and the estimates
        "peak_memory_mb": _round(peak, MIB, 0),
        "peak_memory_kind": None if peak is None else ("GPU allocated" if cuda is not None else "RSS (CPU)"),
        "train_s": _round(v.get("train_seconds"), 1, 1),
        "train_tokens_per_s": _round(v.get("train_tokens_per_s"), 1, 1),
        "eval_loss": _round(v.get("eval_loss"), 1, 4),
        "exact_match": _round(v.get("eval_exact_match"), 1, 4),
        "infer_tokens_per_s": _round(v.get("inference_tokens_per_s"), 1, 1),
        "inference": None if merged is None else ("merged" if merged else "adapter"),
        "mergeable": "yes" if spec.mergeable else "no",
        "note": note or "",
    }


def _round(value: float | None, unit: float, digits: int) -> float | None:
    if value is None:
        return None
    scaled = value / unit
    return round(scaled) if digits == 0 else round(scaled, digits)


def build_rows(db: Database, row: Bakeoff) -> list[dict[str, Any]]:
    notes = row.notes or {}
    return [run_row(db, method, run_id, notes.get(str(run_id)))
            for method, run_id in zip(row.methods, row.run_ids)]


def current_rows(db: Database, row: Bakeoff) -> list[dict[str, Any]]:
    """The table as of now. A run deleted since keeps the figures saved before (the history
    no longer has them)."""
    saved = {r.get("run_id"): r for r in (row.table or [])}
    return [saved.get(r["run_id"], r) if r["status"] == "deleted" else r for r in build_rows(db, row)]


def refresh(db: Database, bakeoff_id: int) -> list[dict[str, Any]]:
    """Rebuild the table from the history and save it with the bake-off."""
    row = db.get_bakeoff(bakeoff_id)
    rows = current_rows(db, row)
    if rows != (row.table or []):
        db.update_bakeoff(bakeoff_id, table=rows)
    return rows


def cell(value: Any) -> str:
    """One value as the Markdown table and the UI show it."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def to_csv(rows: list[dict[str, Any]]) -> str:
    """Plain numbers (no thousands separators), empty for not measured; one header line."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([header for _, header in COLUMNS] + ["run id", "note"])
    for r in rows:
        writer.writerow(["" if r.get(k) is None else r.get(k) for k, _ in COLUMNS]
                        + [r.get("run_id"), r.get("note", "")])
    return out.getvalue()


def to_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(k)).replace("|", "\\|") for k, _ in COLUMNS) + " |")
    notes = [f"- {r['method']}: {r['note']}" for r in rows if r.get("note")]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def scatter_points(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """(log10 trainable parameters, quality) per measured method. Quality is exact match when
    measured, else minus the eval loss (so that higher is better either way); says which."""
    use_em = any(r.get("exact_match") is not None for r in rows)
    points = []
    for r in rows:
        quality = r.get("exact_match") if use_em else (-r["eval_loss"] if r.get("eval_loss") is not None else None)
        if r.get("trainable_params") and quality is not None:
            points.append({"method": r["method"], "log10 trainable parameters": math.log10(r["trainable_params"]),
                           "trainable parameters": r["trainable_params"],
                           ("eval exact match" if use_em else "minus eval loss"): quality})
    return points


def quality_label(rows: list[dict[str, Any]]) -> str:
    return "eval exact match" if any(r.get("exact_match") is not None for r in rows) else "minus eval loss"
