"""The Bake-off section (inside the History tab): choose data, methods and one shared budget,
queue one run per method, and watch the table fill in as they finish; a scatter plot of quality
against trainable parameters; the table as CSV and Markdown downloads.

The UI only queues runs (``studio.bakeoff.start_bakeoff``) and reads the history: the workers
train and measure, and each finished worker starts the next run, so closing the app does not
stop a bake-off. The poll also calls ``launch.dispatch``, which restarts the queue after a
crash; it ticks every ``POLL_SECONDS`` while a run is running or queued and every
``polling.IDLE_SECONDS`` otherwise, and Queue wakes it. Handlers are module functions on plain
values, so tests drive them without a browser.
The user-visible strings are ``labels.BAKEOFF``.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from studio import bakeoff
from studio.bakeoff import table as bt
from studio.db import Database, RunStatus
from studio.methods import all_methods
from studio.ui import data_choice, labels, polling
from studio.ui.train_view import nice_limits
from studio.runs import launch

TXT = labels.BAKEOFF
POLL_SECONDS = 3.0  # while a run is active
SCATTER_COLUMNS = ["method", "trainable parameters (log10)", "quality"]


# ---- handlers ----
def bakeoff_choices(db: Database, project_id: int | None) -> list[tuple[str, int]]:
    rows = db.list_bakeoffs(project_id) if project_id is not None else []
    return [(f"#{r.id} {r.name}", r.id) for r in rows]


def queue_bakeoff(db: Database, project_id: int | None, data: str, methods: list[str], steps: Any,
                  batch: Any, max_length: Any, eval_rows: Any, lr: Any) -> tuple[str, int | None]:
    """Queue a bake-off; (message, its id, or None when refused: then nothing was created)."""
    if project_id is None or db.get_project(project_id) is None:
        return TXT["no_project"], None
    try:
        choice = data_choice.decode(data)
        budget = bakeoff.Budget(max_steps=int(steps), batch_size=int(batch), max_length=int(max_length),
                                eval_rows=int(eval_rows), learning_rate=float(lr) if lr else None)
        row = bakeoff.start_bakeoff(db, project_id, list(methods or []), budget,
                                    sample_task=choice.sample_task, dataset_id=choice.dataset_id)
    except (ValueError, TypeError, LookupError) as exc:
        return TXT["refused"].format(reason=exc), None
    running = [r for r in row.run_ids if db.get_run(r).status == RunStatus.RUNNING.value]
    state = TXT["started"].format(run=running[0]) if running else TXT["waiting"]
    return TXT["queued"].format(id=row.id, n=len(row.run_ids), methods=", ".join(row.methods), state=state), row.id


def status_text(db: Database, row: Any) -> str:
    counts = bakeoff.progress(db, row)
    done = sum(n for s, n in counts.items() if s not in (RunStatus.QUEUED.value, RunStatus.RUNNING.value))
    parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    budget = bakeoff.Budget.from_dict(row.budget)
    data = f"sample task '{row.sample_task}'" if row.sample_task else f"dataset #{row.dataset_id}"
    return (f"**{row.name}** — {done} of {len(row.run_ids)} done ({parts}). Model `{row.model}`, {data}; "
            f"budget {budget.max_steps} steps × batch {budget.batch_size} × max {budget.max_length} tokens, "
            f"exact match on {budget.eval_rows} eval rows.")


def table_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The table as shown: numbers formatted as in the Markdown export ("—": not measured)."""
    return pd.DataFrame([{header: bt.cell(r.get(key)) for key, header in bt.COLUMNS} for r in rows],
                        columns=[header for _, header in bt.COLUMNS])


def scatter_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    label = bt.quality_label(rows)
    points = [{"method": p["method"], "trainable parameters (log10)": p["log10 trainable parameters"],
               "quality": p[label]} for p in bt.scatter_points(rows)]
    return pd.DataFrame(points, columns=SCATTER_COLUMNS)


def plot_limits(points: pd.DataFrame) -> dict[str, list[float] | None]:
    """Axis limits around the points: parameter counts on whole decades (log10), exact match on
    its whole 0-1 scale, so methods can be read against each other; minus eval loss around the
    data."""
    quality, decades = points["quality"], points[SCATTER_COLUMNS[1]]
    if points.empty:
        return {"x_lim": None, "y_lim": None}
    exact_match = bool(((quality >= 0) & (quality <= 1)).all())
    return {"x_lim": [float(math.floor(decades.min() - 0.25)), float(math.ceil(decades.max() + 0.25))],
            "y_lim": [0.0, 1.0] if exact_match else nice_limits(quality)}


def export_files(db: Database, bakeoff_id: int, rows: list[dict[str, Any]]) -> tuple[str, str]:
    """The table as CSV and Markdown files in a temp folder (Gradio serves files from there),
    one folder per studio database: bake-off ids restart in every home, and two studios on one
    machine must not hand out each other's tables."""
    home_key = hashlib.sha256(str(db.path.resolve()).encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "peft-studio-bakeoffs" / home_key
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = folder / f"bakeoff-{bakeoff_id}.csv", folder / f"bakeoff-{bakeoff_id}.md"
    csv_path.write_text(bt.to_csv(rows), encoding="utf-8")
    md_path.write_text(bt.to_markdown(rows), encoding="utf-8")
    return str(csv_path), str(md_path)


def render(db: Database, bakeoff_id: int | None) -> tuple[str, pd.DataFrame, pd.DataFrame, str | None, str | None]:
    """(status, table, scatter points, csv path, markdown path) of a bake-off; refreshes its
    saved table from the history on the way."""
    row = db.get_bakeoff(bakeoff_id) if bakeoff_id is not None else None
    if row is None:
        return TXT["none"], table_frame([]), scatter_frame([]), None, None
    rows = bt.refresh(db, row.id)
    csv_path, md_path = export_files(db, row.id, rows)
    return status_text(db, db.get_bakeoff(row.id)), table_frame(rows), scatter_frame(rows), csv_path, md_path


def changed(db: Database, bakeoff_id: int | None) -> bool:
    """Whether the table built now differs from the one saved (and so shown) last time."""
    row = db.get_bakeoff(bakeoff_id) if bakeoff_id is not None else None
    return row is not None and bt.current_rows(db, row) != (row.table or [])


def cancel(db: Database, bakeoff_id: int | None) -> str:
    if bakeoff_id is None or db.get_bakeoff(bakeoff_id) is None:
        return ""
    return TXT["cancelled"].format(n=bakeoff.cancel_bakeoff(db, bakeoff_id), id=bakeoff_id)


# ---- the section ----
def build(demo: gr.Blocks, db: Database, picker: gr.Dropdown, tab: gr.Tab | None = None) -> gr.Timer:
    """Render the section; returns its poll timer (History turns it off while another tab is open).
    ``tab``: its (sub-)tab; opening it re-lists the datasets (one may have been imported in the
    Data tab since the page loaded), keeping the one picked."""
    budget = bakeoff.Budget()
    gr.Markdown(TXT["intro"])
    with gr.Row():
        with gr.Column(scale=3):
            data = gr.Dropdown(data_choice.choices(db, None), value=data_choice.encode(sample_task="dates"), label=TXT["data"],
                               elem_id="bakeoff-data")
            methods = gr.CheckboxGroup([(m.title, m.name) for m in all_methods()], value=bakeoff.DEFAULT_METHODS,
                                       label=TXT["methods"], elem_id="bakeoff-methods")
        with gr.Column(scale=2):
            with gr.Row():
                steps = gr.Number(budget.max_steps, label=TXT["steps"], minimum=1, precision=0,
                                  elem_id="bakeoff-steps")
                batch = gr.Number(budget.batch_size, label=TXT["batch"], minimum=1, precision=0,
                                  elem_id="bakeoff-batch")
            with gr.Row():
                max_length = gr.Number(budget.max_length, label=TXT["max_length"], minimum=16, precision=0,
                                       elem_id="bakeoff-max-length")
                eval_rows = gr.Number(budget.eval_rows, label=TXT["eval_rows"], minimum=0, precision=0,
                                      elem_id="bakeoff-eval-rows")
            lr = gr.Number(0, label=TXT["lr"], minimum=0, elem_id="bakeoff-lr")
            go = gr.Button(TXT["queue"], variant="primary", elem_id="bakeoff-queue")
            message = gr.Markdown(elem_id="bakeoff-message")
    with gr.Row():
        chosen = gr.Dropdown([], label=TXT["bakeoff"], elem_id="bakeoff-choice", scale=4)
        refresh_btn = gr.Button(TXT["refresh"], size="sm", scale=1, elem_id="bakeoff-refresh")
        cancel_btn = gr.Button(TXT["cancel"], size="sm", variant="stop", scale=1, elem_id="bakeoff-cancel")
    status = gr.Markdown(elem_id="bakeoff-status")
    # Full width: thirteen columns are unreadable beside the form.
    table = gr.Dataframe(interactive=False, wrap=True, elem_id="bakeoff-table")
    with gr.Row():
        # Built afresh when its points change: Gradio 6 draws a one-off update of data and limits
        # together with the previous data, and without limits its axes collapse onto one point.
        points = gr.State(None)
        with gr.Column(scale=3, elem_id="bakeoff-plot-box"):
            @gr.render(inputs=[points], triggers=[points.change])
            def _plot(records):
                frame = pd.DataFrame(records or [], columns=SCATTER_COLUMNS)
                gr.ScatterPlot(frame, x=SCATTER_COLUMNS[1], y="quality", color="method", label=TXT["plot"],
                               y_title="eval exact match (or minus eval loss)", elem_id="bakeoff-plot",
                               **plot_limits(frame))
        with gr.Column(scale=1):
            csv_file = gr.DownloadButton(TXT["csv"], elem_id="bakeoff-csv")
            md_file = gr.DownloadButton(TXT["markdown"], elem_id="bakeoff-md")
    timer = gr.Timer(POLL_SECONDS)

    shown = [status, table, points, csv_file, md_file]

    def show(bakeoff_id):
        text, frame, scatter, csv_path, md_path = render(db, bakeoff_id)
        return text, frame, scatter.to_dict("records"), gr.update(value=csv_path), gr.update(value=md_path)

    def on_project(project_id):
        choices = bakeoff_choices(db, project_id)
        value = choices[0][1] if choices else None
        data_list = data_choice.choices(db, project_id)
        return (gr.update(choices=choices, value=value), gr.update(choices=data_list), *show(value))

    def on_queue(project_id, *values):
        text, new_id = queue_bakeoff(db, project_id, *values)
        choices = bakeoff_choices(db, project_id)
        selected = new_id if new_id is not None else (choices[0][1] if choices else None)
        awake = polling.wake(POLL_SECONDS) if new_id is not None else gr.skip()
        return (text, gr.update(choices=choices, value=selected), *show(selected), awake)

    def on_tick(bakeoff_id, period=None):
        launch.dispatch(db)  # after a crash nothing else advances the queue
        timer_update = polling.pace(period, polling.interval(db, POLL_SECONDS))
        if not changed(db, bakeoff_id):
            return (*(gr.skip() for _ in shown), timer_update)  # no redraw, no new download files
        return (*show(bakeoff_id), timer_update)

    def on_open(project_id, data_v):
        data_list = data_choice.choices(db, project_id)
        return gr.update(choices=data_list, value=data_choice.kept(data_v, data_list, data_list[0][1]))

    if tab is not None:
        tab.select(on_open, [picker, data], [data], api_name=False)
    picker.change(on_project, [picker], [chosen, data, *shown], api_name=False)
    demo.load(on_project, [picker], [chosen, data, *shown], api_name=False)
    go.click(on_queue, [picker, data, methods, steps, batch, max_length, eval_rows, lr],
             [message, chosen, *shown, timer], api_name=False)
    chosen.change(show, [chosen], shown, api_name=False)
    refresh_btn.click(show, [chosen], shown, api_name=False)
    cancel_btn.click(lambda b: cancel(db, b), [chosen], [message], api_name=False).then(
        show, [chosen], shown, api_name=False)
    timer.tick(on_tick, [chosen, timer], [*shown, timer], api_name=False, show_progress="hidden")
    return timer
