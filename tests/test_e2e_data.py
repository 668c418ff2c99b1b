"""Browser test of the Data tab: the newcomer's first look (the Train tab works at once on a
sample; a sample's confirmation is visible where it was clicked), a typed path that wins over an
earlier upload, then a CSV's columns mapped, its preview and histogram."""

from __future__ import annotations

import csv
import re

import pytest

from playwright.sync_api import expect

from browser import browser_page
from test_e2e_method import choose
from test_e2e_shell import shot

pytestmark = pytest.mark.e2e


def write_csv(path, rows: int = 24) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["q_text", "a_text"])  # names no detector knows: the user maps them
        for i in range(rows):
            writer.writerow([f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.\nDone, \"simply\"."])


def test_upload_csv_map_columns_preview_and_histogram(running_app, tmp_path, studio_home):
    from studio.db import Database
    from studio.samples import SAMPLE_TASKS

    data = tmp_path / "qa.csv"
    write_csv(data)
    other = tmp_path / "other.jsonl"
    other.write_text('{"instruction": "hi", "output": "hello"}\n', encoding="utf-8")
    with browser_page() as page:
        page.goto(running_app)
        page.get_by_role("tab", name="Data").click()
        # Issue 15 item 10: the page opens here, so it says that Train needs no import.
        expect(page.locator("#data-intro")).to_contain_text("Train tab can start a run at once")
        # An upload, then a typed path: the path is the newer choice and Inspect reads it (the
        # upload won while it stayed).
        page.locator("#data-upload input[type=file]").set_input_files(str(other))
        page.get_by_text("Columns: instruction, output").wait_for()
        page.locator("#data-path textarea").fill(str(data))
        page.locator("#data-inspect").click()
        expect(page.locator("#data-detected")).to_contain_text("Columns: q_text, a_text", timeout=60_000)

        choose(page, "data-format", "prompt_completion")
        choose(page, "data-slot-0", "q_text")
        choose(page, "data-slot-1", "a_text")
        page.locator("#data-import").click()
        page.get_by_text("Imported: qa").wait_for(timeout=60_000)

        marks = page.locator("#data-preview .token-preview mark.loss")
        marks.first.wait_for(timeout=60_000)
        trained = marks.all_inner_texts()
        # Only answers are trained on; the questions are context.
        assert trained and all(re.search(r"\d+ plus \d+ is \d+\.", t) for t in trained)
        assert not any("What is" in t for t in trained)
        assert re.search(r"What is \d+ plus \d+\?", page.locator("#data-preview .token-preview").first.inner_text())
        page.locator("#data-hist svg").first.wait_for()
        # Bars are measured from 0 (issue 15 item 6: the axis started at the smallest count).
        page.wait_for_function("""() => [...document.querySelectorAll('#data-hist .role-axis-label text')]
            .some(t => t.textContent.trim() === '0')""", timeout=30_000)
        assert "Token lengths" in page.locator("#data-stats").inner_text()
        shot(page, tmp_path, "data-csv-preview")
        sample = next(iter(SAMPLE_TASKS))
        page.locator(f"#sample-{sample}").click()
        confirmation = page.locator("#data-sample-report")
        expect(confirmation).to_contain_text("Imported", timeout=60_000)
        expect(confirmation).to_be_in_viewport()  # it was below the fold, under Import

    db = Database()
    (dataset,) = [d for d in db.list_datasets(db.list_projects()[0].id) if d.name == "qa"]
    assert dataset.format == "prompt_completion" and dataset.num_train + dataset.num_eval == 24
