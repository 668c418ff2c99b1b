"""The Bake-off section's handlers against a real history, and the section inside the app.

No worker runs here: the device is held by a "running" run claimed under this test's pid, so a
queued bake-off waits, exactly as it would behind a real training.
"""

from __future__ import annotations

import os
from pathlib import Path

import gradio as gr
import pytest

from studio import projects
from studio.bakeoff import to_csv, to_markdown
from studio.bakeoff.table import COLUMNS, current_rows
from studio.db import Database
from studio.runspec import RunSpec
from studio.ui import bakeoff_tab as ui

METRICS = {"trainable_params": 11_520, "adapter_bytes": 46_200, "peak_rss_bytes": 9e8, "train_seconds": 80.0,
           "train_tokens_per_s": 200.0, "eval_loss": 1.5, "eval_exact_match": 0.25,
           "inference_tokens_per_s": 15.0, "inference_merged": 0.0}


@pytest.fixture
def busy():
    """A project and a history whose device is taken (by a run claimed with our own pid)."""
    db = Database()
    project = projects.create_project(db, "ui")
    holder = db.create_run(project.id, "someone else's training", "lora", RunSpec(sample_task="dates").to_dict())
    db.enqueue_runs([holder.id])
    assert db.claim_run(None, os.getpid())[0].id == holder.id
    yield db, project.id
    db.update_run(holder.id, status="cancelled")
    db.close()


def test_queue_waits_behind_a_training_and_creates_nothing_when_refused(busy):
    db, pid = busy
    text, new = ui.queue_bakeoff(db, pid, "sample:dates", ["lora", "ia3"], 5, 2, 64, 4, 0)
    assert new is not None and "Bake-off #" in text and "Another run is training" in text
    row = db.get_bakeoff(new)
    assert row.methods == ["lora", "ia3"] and row.budget["max_steps"] == 5 and row.budget["learning_rate"] is None
    assert [db.get_run(r).status for r in row.run_ids] == ["queued", "queued"]
    assert ui.bakeoff_choices(db, pid)[0][1] == new

    before = len(db.list_runs(pid))
    for args, reason in [((None, "sample:dates", ["lora"]), "project"),
                         ((pid, "sample:dates", []), "at least one method"),
                         ((pid, "sample:dates", ["lora", "nope"]), "unknown method")]:
        text, new_id = ui.queue_bakeoff(db, *args, 5, 2, 64, 4, 0)
        assert new_id is None and reason in text
    assert len(db.list_runs(pid)) == before


def test_render_shows_the_table_plot_and_downloads_then_cancel(busy):
    db, pid = busy
    _, new = ui.queue_bakeoff(db, pid, "sample:dates", ["prompt", "lora"], 5, 2, 64, 4, 0.01)
    row = db.get_bakeoff(new)
    prompt_run = row.run_ids[0]
    db.update_run(prompt_run, status="completed")
    db.log_metrics(prompt_run, 5, METRICS)

    status, frame, points, csv_path, md_path = ui.render(db, new)
    assert "1 of 2 done" in status and "5 steps × batch 2 × max 64 tokens" in status
    assert list(frame.columns) == [h for _, h in COLUMNS]
    assert frame.iloc[0]["trainable parameters"] == "11,520" and frame.iloc[1]["final eval loss"] == "—"
    assert points.to_dict("records") == [{"method": "Prompt tuning", "trainable parameters (log10)":
                                          pytest.approx(4.0614, abs=1e-3), "quality": 0.25}]
    rows = current_rows(db, db.get_bakeoff(new))
    assert Path(csv_path).read_text() == to_csv(rows) and Path(md_path).read_text() == to_markdown(rows)
    assert db.get_bakeoff(new).table == rows  # saved with the project
    assert ui.changed(db, new) is False
    db.log_metrics(prompt_run, 5, {"eval_loss": 1.25})
    assert ui.changed(db, new) is True

    assert "Cancelled 1 run" in ui.cancel(db, new)
    assert db.get_run(row.run_ids[1]).status == "cancelled"
    assert ui.render(db, None)[0] == ui.TXT["none"]


def test_the_section_builds_alone_and_inside_the_app():
    db = Database()
    with gr.Blocks() as demo:
        picker = gr.Dropdown(choices=[], value=None)
        ui.build(demo, db, picker)
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"bakeoff-queue", "bakeoff-table", "bakeoff-plot-box", "bakeoff-csv", "bakeoff-md"} <= ids

    from studio.ui.app import build_app

    app = build_app(db)
    ids = {getattr(b, "elem_id", None) for b in app.blocks.values()}
    assert {"history-tab-bake-off", "bakeoff-queue", "bakeoff-methods"} <= ids


def test_download_files_of_two_studio_homes_never_collide(tmp_path):
    rows_a, rows_b = [{"method": "LoRA"}], [{"method": "IA3"}]
    a, b = Database(tmp_path / "a" / "studio.db"), Database(tmp_path / "b" / "studio.db")
    paths_a, paths_b = ui.export_files(a, 1, rows_a), ui.export_files(b, 1, rows_b)
    assert set(paths_a).isdisjoint(paths_b)  # the same bake-off id in two homes
    assert Path(paths_a[0]).read_text() == to_csv(rows_a) and Path(paths_b[0]).read_text() == to_csv(rows_b)
    a.close(), b.close()


def test_plot_limits_frame_the_points():
    import pandas as pd

    one = pd.DataFrame([["LoRA", 4.06, 0.25]], columns=ui.SCATTER_COLUMNS)
    limits = ui.plot_limits(one)
    assert limits["y_lim"] == [0.0, 1.0]  # exact match: its whole scale
    assert limits["x_lim"] == [3.0, 5.0]  # whole decades of parameters around the point
    losses = pd.DataFrame([["LoRA", 6.7, -1.25], ["IA3", 4.1, -2.5]], columns=ui.SCATTER_COLUMNS)
    assert ui.plot_limits(losses)["x_lim"] == [3.0, 7.0]
    low, high = ui.plot_limits(losses)["y_lim"]
    assert low <= -2.5 and -1.25 <= high <= 0
    assert ui.plot_limits(pd.DataFrame(columns=ui.SCATTER_COLUMNS)) == {"x_lim": None, "y_lim": None}
