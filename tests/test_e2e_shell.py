"""Browser test of the app shell: every tab opens, a project is created and deleted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from browser import browser_page
from studio.ui import labels

pytestmark = pytest.mark.e2e

# Tabs that are built, and an element each shows once ready.
BUILT = {"Method": "#method-count h2", "Data": "#data-inspect", "Train": "#train-start", "Export": "#export-go",
         "History": "#history-runs", "Compare": "#compare-load", "Serve": "#serve-start"}


def shot(page, tmp_path: Path, name: str) -> Path:
    """Save a screenshot in the test's tmp dir (and in $STUDIO_SCREENSHOTS when set)."""
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    extra = os.environ.get("STUDIO_SCREENSHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(extra) / f"{name}.png"), full_page=True)
    assert path.stat().st_size > 10_000  # a real rendered page, not a blank
    return path


def test_every_tab_opens_and_a_project_is_created_and_deleted(running_app, tmp_path, studio_home):
    from studio.db import Database

    with browser_page() as page:
        page.goto(running_app)
        page.wait_for_selector("#app-header")
        page.get_by_text("GPU").first.wait_for()  # the system panel has been filled in
        for name in labels.TABS:
            page.get_by_role("tab", name=name).click()
            if name == "Data":
                page.get_by_text("Start from a sample task").wait_for()
            page.locator(BUILT[name]).first.wait_for(state="visible")
            shot(page, tmp_path, f"tab-{name.lower()}")

        page.get_by_text(labels.MANAGE).click()
        page.locator("#project-new-name textarea, #project-new-name input").first.fill("Browser project")
        page.locator("#project-create").click()
        page.get_by_text("Created 'Browser project'").wait_for()
        db = Database()
        project = db.get_project_by_name("Browser project")
        assert project is not None and (studio_home / "projects" / project.folder).is_dir()
        shot(page, tmp_path, "project-created")

        page.locator("#project-delete").click()
        page.get_by_text("Delete 'Browser project'?").wait_for()
        page.locator("#project-delete-yes").click()
        page.get_by_text("Deleted 'Browser project'").wait_for()
        assert db.get_project_by_name("Browser project") is None
        assert not (studio_home / "projects" / project.folder).exists()
