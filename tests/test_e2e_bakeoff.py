"""Browser test of the Bake-off section (History tab): methods ticked and a budget typed in the
form queue one run per method behind a training that holds the device; the table and the
scatter plot fill by themselves as a run's measurements arrive; the CSV download is the table;
"Cancel the rest" cancels the runs still waiting.

No worker trains here (test_bakeoff.py trains bake-offs through real workers): the device is
held by a run claimed under this test's own pid, so the queued runs wait, as they would behind a
real training, and the measurements are written through the real Database as a worker writes
them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from browser import browser_page
from test_e2e_history import table_rows
from test_e2e_shell import shot
from studio import bakeoff, projects
from studio.bakeoff.table import current_rows
from studio.db import Database
from studio.methods import get_method
from studio.runspec import RunSpec

pytestmark = pytest.mark.e2e

KEEP = ["lora", "ia3"]
MEASURED = {"trainable_params": 11_520, "adapter_bytes": 46_200, "peak_rss_bytes": 9e8, "train_seconds": 80.0,
            "train_tokens_per_s": 200.0, "eval_loss": 1.5, "eval_exact_match": 0.25,
            "inference_tokens_per_s": 15.0, "inference_merged": 1.0}
SYMBOLS = "() => document.querySelectorAll('#bakeoff-plot g.mark-symbol path').length"


def test_bakeoff_queues_fills_its_table_and_plot_downloads_and_cancels(running_app, tmp_path):
    db = Database()
    project = projects.create_project(db, "Bake-off e2e")
    holder = db.create_run(project.id, "someone else's training", "lora", RunSpec(sample_task="dates").to_dict())
    db.enqueue_runs([holder.id])
    assert db.claim_run(None, os.getpid())[0].id == holder.id

    with browser_page(height=1400) as page:
        page.goto(running_app)
        page.wait_for_selector("#app-header")
        page.get_by_role("tab", name="History").click()
        page.get_by_role("tab", name="Bake-off").click()
        page.locator("#bakeoff-status").get_by_text("No bake-off in this project yet").wait_for()

        methods = page.locator("#bakeoff-methods")
        for name in bakeoff.DEFAULT_METHODS:
            if name not in KEEP:
                methods.get_by_text(get_method(name).title, exact=True).click()
        page.locator("#bakeoff-steps input").fill("5")
        page.locator("#bakeoff-queue").click()
        page.locator("#bakeoff-message").get_by_text("Another run is training").wait_for()
        (row,) = db.list_bakeoffs(project.id)
        assert sorted(row.methods) == sorted(KEEP) and row.budget["max_steps"] == 5
        assert [db.get_run(r).status for r in row.run_ids] == ["queued", "queued"]
        page.locator("#bakeoff-status").get_by_text("0 of 2 done").wait_for()
        assert sorted(r[0] for r in table_rows(page, "bakeoff-table")) == sorted(
            get_method(m).title for m in KEEP)

        # One run's measurements arrive (as its worker writes them): the poll redraws the table
        # and puts the run's point on the plot, with no click.
        first = row.run_ids[0]
        db.update_run(first, status="completed")
        db.log_metrics(first, 5, MEASURED)
        page.locator("#bakeoff-table").get_by_text("11,520").first.wait_for(state="attached", timeout=20_000)
        page.locator("#bakeoff-status").get_by_text("1 of 2 done").wait_for()
        page.wait_for_function(f"() => ({SYMBOLS})() >= 1", timeout=20_000)
        shot(page, tmp_path, "bakeoff-filled")

        with page.expect_download() as download:
            page.locator("#bakeoff-csv").click()
        saved = Path(download.value.path()).read_text(encoding="utf-8")
        assert saved == bakeoff.to_csv(current_rows(db, db.get_bakeoff(row.id)))

        page.locator("#bakeoff-cancel").click()
        page.locator("#bakeoff-message").get_by_text(f"Cancelled 1 run(s) of bake-off #{row.id}").wait_for()
        assert [db.get_run(r).status for r in row.run_ids] == ["completed", "cancelled"]

    db.update_run(holder.id, status="cancelled")
    db.close()
