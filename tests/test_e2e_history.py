"""Browser test of the History tab: a run trained by the real worker and a recorded one appear
with their numbers; a run opens with its curves and log; two runs ticked in "Run comparison" show
their loss curves overlaid and exactly the configuration fields that differ; "Clone into Train
tab" puts the run's RunSpec into the session's run draft, switches to the Train tab, and both the
Train and Method tabs show it.

The real run trains the tiny random model (``tiny_chat_model``) for four steps: about a minute on
two CPU cores, most of it the worker's start-up and the evaluations.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

from browser import browser_page
from test_e2e_shell import shot
from studio import history, projects
from studio.db import Database, RunStatus, utcnow
from studio.methods import get_method
from studio.runspec import RunSpec
from studio.ui import history_view, labels
from studio.runs import launch

pytestmark = pytest.mark.e2e

VALID_LINE = """sel => [...document.querySelectorAll(sel + ' g.mark-line path')]
    .filter(p => /^M[\\d.]+,[\\d.]+L/.test(p.getAttribute('d') || '')).length"""


def train_real_run(db: Database, project_id: int, model: str):
    spec = RunSpec(model=model, sample_task="dates", max_steps=4, eval_steps=2, exact_match_limit=2)
    run = launch.create_run(db, project_id, spec, name="real lora")
    launch.start(db, run.id)
    deadline = time.monotonic() + 400
    while db.get_run(run.id).status == RunStatus.RUNNING.value and time.monotonic() < deadline:
        launch.reconcile(db)
        time.sleep(1)
    run = db.get_run(run.id)
    assert run.status == RunStatus.COMPLETED.value, run.error
    return run


def recorded_run(db: Database, project_id: int, model: str):
    """A second run, its metrics written through the real Database as the worker writes them."""
    spec = RunSpec(model=model, sample_task="dates", method="dora", method_settings={"r": 8},
                   learning_rate=1e-3, max_steps=4, eval_steps=2, exact_match_limit=2)
    run = launch.create_run(db, project_id, spec, name="recorded dora")
    for step, loss in enumerate([11.0, 10.6, 10.3, 10.1], start=1):
        db.log_metrics(run.id, step, {"loss": loss, "learning_rate": 1e-3, "peak_memory_bytes": 9e8})
    # One evaluation only: the run comparison's eval chart must still draw it (issue 15 item 5).
    db.log_metrics(run.id, 4, {"eval_loss": 10.2})
    started = utcnow() - timedelta(minutes=2)
    return db.update_run(run.id, status="completed", started_at=started, finished_at=started + timedelta(seconds=30))


def table_rows(page, elem_id: str) -> list[list[str]]:
    """A Dataframe's rows as shown (Gradio 6 draws them as div rows and grid cells)."""
    return page.evaluate("""id => [...document.querySelectorAll('#' + id + ' .virtual-row[role=row]')]
        .map(r => [...r.querySelectorAll('[role=gridcell]')].map(c => c.textContent.trim()))""", elem_id)


def test_history_lists_opens_compares_and_clones_runs(running_app, tmp_path, studio_home, tiny_chat_model):
    db = Database()
    project = projects.create_project(db, "History e2e", model_source=str(tiny_chat_model))
    real = train_real_run(db, project.id, str(tiny_chat_model))
    other = recorded_run(db, project.id, str(tiny_chat_model))
    expected = history_view.runs_table(history.run_summaries(db, project.id))
    real_row = expected[expected["#"] == str(real.id)].iloc[0]

    with browser_page(height=1200) as page:
        page.goto(running_app)
        page.wait_for_selector("#app-header")
        page.get_by_role("tab", name="History").click()
        table = page.locator("#history-runs")
        table.get_by_text("real lora").wait_for(timeout=30_000)
        # The numbers the worker recorded, as the table shows them (cells scrolled out of view
        # are still in the page: read them, not their visibility).
        shown = {row[0]: row for row in table_rows(page, "history-runs")}
        assert shown[str(real.id)] == list(real_row) and shown[str(other.id)][1] == "recorded dora"
        assert all(real_row[c] != "—" for c in ("train loss", "eval loss", "eval exact match", "peak memory"))

        # The newest run opens on its own; a click on the other row opens that one.
        page.locator("#history-run-summary").get_by_text(f"#{other.id} recorded dora").wait_for()
        table.get_by_text("real lora").click()
        page.locator("#history-run-summary").get_by_text(f"#{real.id} real lora").wait_for()
        page.wait_for_function(f"() => ({VALID_LINE})('#history-run-loss') >= 2", timeout=30_000)
        page.wait_for_function(
            "() => (document.querySelector('#history-log textarea') || {}).value?.includes('completed')")
        shot(page, tmp_path, "history-run")

        # A run that changes elsewhere (a worker logging a step) shows without any click.
        db.log_metrics(other.id, 5, {"loss": 9.8765})
        table.get_by_text("9.8765").wait_for(timeout=15_000)

        page.get_by_role("tab", name=labels.HISTORY["compare"]).click()
        pick = page.locator("#history-compare-pick")
        pick.get_by_text(f"#{real.id} real lora").click()
        pick.get_by_text(f"#{other.id} recorded dora").click()
        for plot in ("history-compare-train", "history-compare-eval"):
            page.wait_for_function(f"() => ({VALID_LINE})('#{plot}') === 2", timeout=30_000)
        diff = page.locator("#history-compare-diff")
        diff.get_by_text("learning_rate", exact=True).wait_for()
        fields = {row[0] for row in history.run_config_diff(db, [other.id, real.id])}
        assert fields == {"method", "method_settings.r", "method_settings.use_dora", "learning_rate"}
        assert {row[0] for row in table_rows(page, "history-compare-diff")} == fields
        assert "4 configuration field(s) differ" in page.locator("#history-compare-message").inner_text()
        shot(page, tmp_path, "history-compare")

        # Clone the DoRA run: the Train tab opens with DoRA, and the Method tab keeps rank 8. Both
        # tabs draw from the session's run draft, so every wait is for a state, however long the
        # events take to arrive (a loaded CI machine).
        page.get_by_role("tab", name="Runs", exact=True).click()
        page.locator("#history-run input").first.click()
        page.get_by_role("option", name=f"#{other.id} recorded dora — completed").click()
        page.locator("#history-run-summary").get_by_text(f"#{other.id} recorded dora").wait_for()
        page.locator("#history-clone").click()
        page.locator("#train-start").wait_for(state="visible", timeout=60_000)
        title = get_method("dora").title
        page.wait_for_function(
            "t => (document.querySelector('#train-method input') || {}).value === t", arg=title, timeout=60_000)
        page.get_by_text(labels.TRAIN_ADVANCED).click()  # a closed accordion renders nothing inside
        page.wait_for_function(
            "() => (document.querySelector('#train-learning-rate input') || {}).value === '0.001'",
            timeout=60_000)
        page.get_by_role("tab", name="Method").click()
        page.wait_for_function("() => (document.querySelector('#param-r input') || {}).value === '8'",
                               timeout=60_000)
        page.wait_for_function(
            "t => (document.querySelector('#method-choice input') || {}).value === t", arg=title, timeout=60_000)
        # Back on the Train tab: still DoRA (opening a tab redraws it from the draft, never undoes it).
        page.get_by_role("tab", name="Train").click()
        page.wait_for_function(
            "t => (document.querySelector('#train-method input') || {}).value === t", arg=title, timeout=60_000)
        shot(page, tmp_path, "history-cloned")

        # Back in History: a note on the recorded run, then delete it after confirming. Its row
        # and folder go; the trained run and its folder stay.
        page.get_by_role("tab", name="History").click()
        page.get_by_role("tab", name="Runs", exact=True).click()
        page.locator("#history-run-summary").get_by_text(f"#{other.id} recorded dora").wait_for()
        page.locator("#history-notes textarea").fill("lr too high")
        page.locator("#history-save-note").click()
        page.locator("#history-message").get_by_text("note saved").wait_for()
        assert db.get_run(other.id).notes == "lr too high"
        folder = launch.run_folder(db, other)
        page.locator("#history-delete").click()
        page.locator("#history-delete-confirm").get_by_text(f"Delete run #{other.id}").wait_for()
        page.locator("#history-delete-yes").click()
        page.locator("#history-message").get_by_text(f"deleted run #{other.id}").wait_for()
        page.wait_for_function(
            "id => ![...document.querySelectorAll('#history-runs .virtual-row [role=gridcell]:first-child')]"
            ".some(c => c.textContent.trim() === id)", arg=str(other.id))
        assert db.get_run(other.id) is None and not folder.exists()
        assert launch.run_folder(db, db.get_run(real.id)).is_dir()
        shot(page, tmp_path, "history-deleted")
