"""Browser test: what happens in one tab shows in the others when they are opened, without a
reload. A run that finishes (or is stopped with a checkpoint) and a dataset imported after the
page loaded appear in the Export tab's runs, the Compare tab's adapters and eval sets, and the Bake-off section's data list, and
what the user had already picked stays picked.

The run is recorded through the real Database as a worker records it (its adapter file is only
listed here, never loaded); the dataset is imported through the studio's real importer.
"""

from __future__ import annotations

import json
import time

import pytest

from browser import browser_page
from studio import projects
from studio.data import import_dataset
from studio.db import Database
from studio.runspec import RunSpec
from studio.runs import launch

pytestmark = pytest.mark.e2e


def finished_run(db: Database, project_id: int, name: str):
    run = launch.create_run(db, project_id, RunSpec(sample_task="dates"), name=name)
    adapter = launch.run_folder(db, run) / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    return db.update_run(run.id, status="completed")


def stopped_run(db: Database, project_id: int, name: str, step: int):
    """A run stopped with Stop and save: cancelled, a checkpoint on disk, no final adapter."""
    run = launch.create_run(db, project_id, RunSpec(sample_task="dates"), name=name)
    checkpoint = launch.run_folder(db, run) / "checkpoints" / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "adapter_model.safetensors").write_bytes(b"")
    db.add_checkpoint(run.id, step, str(checkpoint))
    return db.update_run(run.id, status="cancelled")


def dropdown_options(page, elem_id: str) -> list[str]:
    """A Gradio dropdown's options, as the user sees them when it is opened."""
    page.locator(f"#{elem_id} input").first.click()
    options = page.locator("ul[role=listbox] li")
    options.first.wait_for()
    texts = [t.strip() for t in options.all_inner_texts()]
    page.keyboard.press("Escape")
    page.locator(f"#{elem_id} input").first.blur()
    return texts


def wait_for_option(page, elem_id: str, text: str, timeout: float = 20.0) -> list[str]:
    """The dropdown's options once one of them contains ``text`` (a tab's refresh on opening
    is an event of its own: it lands a moment after the click)."""
    deadline = time.monotonic() + timeout
    while True:
        options = dropdown_options(page, elem_id)
        if any(text in o for o in options) or time.monotonic() > deadline:
            return options
        time.sleep(0.5)


def test_runs_and_datasets_made_after_page_load_show_when_a_tab_is_opened(running_app, tmp_path):
    db = Database()
    project = projects.create_project(db, "Refresh e2e")
    first = finished_run(db, project.id, "before load")

    with browser_page(height=1200) as page:
        page.goto(running_app)
        page.wait_for_selector("#app-header")
        page.get_by_role("tab", name="Export").click()
        page.wait_for_function("() => (document.querySelector('#export-run input') || {}).value?.includes('before load')")

        # Meanwhile (another tab, the worker): a run finishes and a dataset is imported.
        second = finished_run(db, project.id, "after load")
        stopped = stopped_run(db, project.id, "stopped and saved", step=2)
        data = tmp_path / "qa.jsonl"
        data.write_text("\n".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) for i in range(20)))
        dataset = import_dataset(db, project, data, eval_ratio=0.2).dataset

        # Export: the new run is listed; the run shown stays the one that was picked.
        page.get_by_role("tab", name="Compare").click()
        page.get_by_role("tab", name="Export").click()
        assert any(f"#{second.id} after load" in o for o in wait_for_option(page, "export-run", "after load"))
        assert f"#{first.id} before load" in page.locator("#export-run input").first.input_value()
        # A run stopped with a checkpoint can be exported too (issue 15), from that checkpoint.
        options = wait_for_option(page, "export-run", "stopped and saved")
        assert any(f"#{stopped.id} stopped and saved" in o for o in options), options
        page.locator("#export-run input").first.click()
        page.locator("ul[role=listbox] li", has_text="stopped and saved").first.click()
        page.wait_for_function("() => (document.querySelector('#export-weights input') || {})"
                               ".value?.includes('checkpoint at step 2')")

        # Compare: both runs' adapters and the dataset as an eval set.
        page.get_by_role("tab", name="Compare").click()
        adapters = wait_for_option(page, "compare-adapters", "after load")
        assert {f"#{first.id} before load", f"#{second.id} after load"} <= set(adapters)
        page.get_by_text("Compare on an eval set (exact match)").click()
        assert any(dataset.name in o for o in wait_for_option(page, "compare-task", dataset.name))

        # Bake-off: the dataset in its data list.
        page.get_by_role("tab", name="History").click()
        page.get_by_role("tab", name="Bake-off").click()
        assert any(dataset.name in o for o in wait_for_option(page, "bakeoff-data", dataset.name))
    db.close()
