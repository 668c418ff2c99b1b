"""What the History tab shows, computed from the database alone: the runs table, one run's
detail (curves, runspec, log), the overlaid curves and configuration diff of several runs, and
the project's datasets and exports. No Gradio components are built here, so tests (and the
bake-off, which compares runs too) can render without a browser.

Plot frames are built with the Train tab's ``train_view.frame`` (every series present in every
frame, float columns): Gradio's plot fixes its colours and axis types when it draws, and only
redraws them when its limits or legend change, so each comparison sends new limits and legend.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from studio import history
from studio.db import Database
from studio.db.summary import project_counts
from studio.runs import outcome
from studio.adapters import derived
from studio.ui import labels, train_view
from studio.ui.labels_compose import DERIVED

# (RunSummary field, column title): the runs table, left to right.
RUN_COLUMNS = (("id", "#"), ("name", "name"), ("status", "status"), ("method", "method"),
               ("settings", "key settings"), ("steps", "steps"), ("train_loss", "train loss"),
               ("eval_loss", "eval loss"), ("eval_score", "eval exact match"), ("duration_s", "duration"),
               ("peak_memory_bytes", "peak memory"), ("created_at", "created"), ("notes", "notes"))
SORT_CHOICES = [(title, field) for field, title in RUN_COLUMNS if field != "notes"]
# Distinct on light and dark backgrounds; a run keeps its colour in both comparison plots.
PALETTE = ("#2563eb", "#f97316", "#16a34a", "#dc2626", "#9333ea", "#0891b2", "#ca8a04", "#db2777")
MAX_COMPARE = len(PALETTE)
DETAIL_LOG_LINES = 40
EMPTY = "—"


def memory(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return EMPTY
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


def cell(field: str, value: Any) -> str:
    """A RunSummary value as the table shows it."""
    if value is None:
        return EMPTY
    if field in ("train_loss", "eval_loss"):
        return f"{value:.4f}"
    if field == "eval_score":
        return f"{value:.1%}"
    if field == "duration_s":
        return train_view.duration(value)
    if field == "peak_memory_bytes":
        return memory(value)
    if field == "created_at":
        return value.astimezone().strftime("%Y-%m-%d %H:%M")  # the user's clock, not UTC
    return str(value)


def status_text(row: history.RunSummary) -> str:
    """The status as the table shows it: a cancelled run says how it was stopped ("cancelled
    (saved)" keeps a checkpoint to resume from, "cancelled (discarded)" does not)."""
    return f"{row.status} ({row.stopped})" if row.stopped else row.status


def method_text(row: history.RunSummary) -> str:
    """The method as the table shows it: a combined adapter says so ("lora · combined")."""
    return f"{row.method} · {DERIVED['marker']}" if row.derived else row.method


def _shown(row: history.RunSummary, field: str) -> str:
    if field == "status":
        return status_text(row)
    return method_text(row) if field == "method" else cell(field, getattr(row, field))


def runs_table(rows: list[history.RunSummary]) -> pd.DataFrame:
    return pd.DataFrame([[_shown(r, f) for f, _ in RUN_COLUMNS] for r in rows],
                        columns=[title for _, title in RUN_COLUMNS], dtype=str)


def run_label(run_id: int, name: str, width: int = 36) -> str:
    text = f"#{run_id} {name}"
    return text if len(text) <= width else text[:width - 1] + "…"


def run_choices(rows: list[history.RunSummary]) -> list[tuple[str, int]]:
    return [(f"#{r.id} {r.name} — {status_text(r)}", r.id) for r in rows]


# ---- one run ----
@dataclass
class RunDetail:
    summary: str
    loss: pd.DataFrame
    lr: pd.DataFrame
    x_lim: list[float]
    runspec: str
    log: str
    name: str
    notes: str


def run_detail(db: Database, run_id: int | None) -> RunDetail:
    """Everything the run panel shows; an empty panel for no (or a deleted) run."""
    view = train_view.render_run(db, run_id)  # the Train tab's frames: same curves, same colours
    if view.run is None:
        return RunDetail(labels.HISTORY["pick_run"], view.loss, view.lr,
                         view.x_lim, "", "", "", "")
    run = view.run
    (row,) = history.summarize(db, [run])
    facts = [(title, outcome.status_words(db, run) if field == "status" else _shown(row, field))
             for field, title in RUN_COLUMNS[2:-1]]
    recipe = derived.describe(db, run)
    if recipe is not None:  # a combined adapter: its settings are how it was made, parents by their names now
        facts[2] = (DERIVED["recipe_row"], recipe.replace("|", "\\|"))
    facts += [("run folder", f"`{run.folder or EMPTY}`")]
    table = "\n".join(f"| {k} | {v} |" for k, v in facts)
    text = f"### #{run.id} {run.name}\n| field | value |\n|---|---|\n{table}"
    if recipe is not None:
        text += f"\n\n{DERIVED['panel_note']}"
    if run.error:
        text += f"\n\n**What went wrong:**\n```\n{run.error.strip()}\n```"
    return RunDetail(text, view.loss, view.lr, view.x_lim, json.dumps(run.spec, indent=2),
                     train_view.clean_log(db, run, DETAIL_LOG_LINES), run.name, run.notes or "")


# ---- several runs ----
@dataclass
class Comparison:
    train: pd.DataFrame
    eval: pd.DataFrame
    color_map: dict[str, str]
    labels: list[str]
    x_lim: list[float]
    results: pd.DataFrame
    diff: pd.DataFrame


def comparison(db: Database, run_ids: list[int]) -> Comparison:
    """Train and eval loss of each run (one colour per run, the same in both plots), their final
    numbers, and the configuration fields that differ between them."""
    runs = [r for r in (db.get_run(i) for i in run_ids) if r is not None]
    labels = [run_label(r.id, r.name) for r in runs]
    train, evals, last = [], [], 1.0
    for run, label in zip(runs, labels):
        points: dict[str, list[tuple[int, float]]] = {}
        for metric in db.metrics_for(run.id, names=["loss", "eval_loss"]):
            points.setdefault(metric.name, []).append((metric.step, metric.value))
            last = max(last, float(metric.step))
        train.append(train_view.frame(points, {"loss": label}))
        evals.append(train_view.frame(points, {"eval_loss": label}))
    empty = train_view.frame({}, {})
    rows = history.summarize(db, runs)
    results = pd.DataFrame([[label] + [cell(f, getattr(r, f)) for f, _ in RUN_COLUMNS[2:-2]]
                            for label, r in zip(labels, rows)],
                           columns=["run"] + [t for _, t in RUN_COLUMNS[2:-2]], dtype=str)
    return Comparison(pd.concat(train, ignore_index=True) if train else empty,
                      pd.concat(evals, ignore_index=True) if evals else empty,
                      dict(zip(labels, PALETTE)), labels, [0.0, last], results,
                      diff_table(labels, history.run_config_diff(db, [r.id for r in runs])))


def shown_value(value: Any) -> str:
    if value == history.MISSING or isinstance(value, str):
        return value
    return json.dumps(value)  # lists, numbers, true/false, null: as in runspec.json


def diff_table(labels: list[str], rows: list[tuple[str, list[Any]]]) -> pd.DataFrame:
    return pd.DataFrame([[key, *(shown_value(v) for v in values)] for key, values in rows],
                        columns=["field", *labels], dtype=str)


# ---- the project ----
def projects_table(db: Database) -> pd.DataFrame:
    counts = project_counts(db)
    rows = [[p.name, p.model_source, *(str(counts.get(p.id, {}).get(k, 0)) for k in ("datasets", "runs", "exports")),
             cell("created_at", p.updated_at)] for p in db.list_projects()]
    return pd.DataFrame(rows, columns=["project", "model", "datasets", "runs", "exports", "last used"], dtype=str)


def datasets_table(db: Database, project_id: int | None) -> pd.DataFrame:
    rows = [[str(d.id), d.name, d.format or EMPTY, *(str(v) if v is not None else EMPTY
                                                      for v in (d.num_rows, d.num_train, d.num_eval)),
             cell("created_at", d.created_at)]
            for d in (db.list_datasets(project_id) if project_id is not None else [])]
    return pd.DataFrame(rows, columns=["#", "dataset", "format", "rows", "train", "eval", "imported"], dtype=str)


def exports_table(db: Database, project_id: int | None) -> pd.DataFrame:
    rows = []
    for e in db.list_exports(project_id) if project_id is not None else []:
        run = db.get_run(e.run_id) if e.run_id is not None else None
        rows.append([str(e.id), run_label(run.id, run.name) if run else "(run deleted)", e.kind, e.dtype or EMPTY,
                     e.status, memory(e.size_bytes) if e.size_bytes else EMPTY, e.path,
                     cell("created_at", e.created_at)])
    return pd.DataFrame(rows, columns=["#", "run", "kind", "dtype", "status", "size", "path", "created"], dtype=str)
