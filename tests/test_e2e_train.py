"""Browser test of the Train tab: from a fresh start to a running training in at most 5 clicks
and no typing, watch the loss curve grow, stop it (keeping a checkpoint) and see it cancelled.

The project's model is "default", the real SmolLM2-135M, already converted from GGUF (conftest's
``default_model_cached``: the conversion is test_models.py's business); it trains at one to a
few seconds per step on a small CPU, hence the long waits below.
"""

from __future__ import annotations

import re

import pytest

from browser import browser_page
from test_e2e_shell import shot

pytestmark = pytest.mark.e2e

MAX_CLICKS = 5


class Clicker:
    """Counts every click of the measured flow."""

    def __init__(self, page):
        self.page, self.count = page, 0

    def __call__(self, locator) -> None:
        self.count += 1
        locator.click()


def progress_step(page) -> int:
    match = re.search(r"Step (\d+)", page.locator("#train-progress").inner_text())
    return int(match.group(1)) if match else 0


def wait_for_step(page, at_least: int, timeout_ms: int) -> None:
    page.wait_for_function(
        """n => { const m = /Step (\\d+)/.exec((document.querySelector('#train-progress') || {}).innerText || '');
                  return m && parseInt(m[1]) >= n; }""", arg=at_least, timeout=timeout_ms)


def loss_path(page) -> str:
    return page.locator("#train-loss-plot g.mark-line path").first.get_attribute("d") or ""


def test_sample_task_training_in_two_clicks_live_curve_then_stop(default_model_cached, running_app, tmp_path,
                                                                 studio_home):
    from studio.db import Database

    with browser_page() as page:
        page.goto(running_app)
        page.wait_for_selector("#app-header")
        click = Clicker(page)

        click(page.get_by_role("tab", name="Train"))
        page.locator("#train-start").wait_for(state="visible")
        # The defaults make Start enough: the first sample task, LoRA, the project's model.
        assert "Dates" in page.locator("#train-data input").first.input_value()
        page.wait_for_function(
            "() => (document.querySelector('#train-estimate') || {}).innerText?.includes('GiB')",
            timeout=120_000)
        click(page.locator("#train-start"))
        page.get_by_text(re.compile(r"Started run #\d+")).wait_for(timeout=30_000)
        assert click.count <= MAX_CLICKS
        page.locator("#train-status").get_by_text("running").wait_for(timeout=30_000)

        # The first steps take a while (the worker loads the model); then the curve grows.
        wait_for_step(page, 2, 240_000)
        page.locator("#train-loss-plot g.mark-line path").first.wait_for(timeout=30_000)
        first_path, first_step = loss_path(page), progress_step(page)
        wait_for_step(page, first_step + 2, 120_000)
        page.wait_for_function(
            "old => { const p = document.querySelector('#train-loss-plot g.mark-line path');"
            " return p && p.getAttribute('d') !== old && p.getAttribute('d').length > old.length; }",
            arg=first_path, timeout=30_000)
        assert re.search(r"ETA \d", page.locator("#train-progress").inner_text())
        assert page.locator("#train-lr-plot g.mark-line path").count() >= 1
        assert page.locator("#train-speed-plot g.mark-line path").count() >= 1
        assert "loss" in page.locator("#train-log textarea").input_value()
        shot(page, tmp_path, "train-running")

        page.locator("#train-stop").click()
        page.locator("#train-message").get_by_text(re.compile(r"Stopping run #\d+|Run #\d+ stopped")).wait_for(
            timeout=30_000)
        page.locator("#train-status").get_by_text("cancelled").wait_for(timeout=180_000)
        # The acknowledgement does not outlive the stop: it becomes what happened.
        page.locator("#train-message").get_by_text(re.compile(r"Run #\d+ stopped.*cancelled.*checkpoint is kept")
                                                   ).wait_for(timeout=30_000)
        page.locator("#train-summary").get_by_text("final train loss").wait_for(timeout=30_000)
        shot(page, tmp_path, "train-stopped")

        db = Database()
        (run,) = db.list_runs()
        assert run.status == "cancelled" and run.spec["sample_task"] == "dates"
        assert db.latest_checkpoint(run.id) is not None  # "Stop and save" kept one
