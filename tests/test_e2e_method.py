"""Browser test of the Method tab: change method and rank, see the count and the bar change."""

from __future__ import annotations

import re

import pytest

from browser import browser_page
from test_e2e_shell import shot

pytestmark = pytest.mark.e2e


def count_text(page) -> str:
    return page.locator("#method-count h2").inner_text()


def wait_for_count(page, expected: str) -> None:
    page.wait_for_function(
        "want => (document.querySelector('#method-count h2') || {}).innerText?.includes(want)",
        arg=expected, timeout=30_000)


def bar_svg(page) -> str:
    page.locator("#memory-bar svg").first.wait_for()
    return page.locator("#memory-bar").inner_html()


def choose(page, elem_id: str, option: str) -> None:
    """Pick ``option`` in the Gradio dropdown ``elem_id`` (its list renders inside it)."""
    page.locator(f"#{elem_id} input").first.click()
    page.locator(f"#{elem_id}").get_by_role("option", name=option, exact=True).click()


def test_method_and_rank_change_the_count_and_the_bar(running_app, tmp_path):
    with browser_page() as page:
        page.goto(running_app)
        page.get_by_role("tab", name="Method").click()
        # LoRA r=16 on all seven projections of SmolLM2-135M (closed form, equal to PEFT's count).
        wait_for_count(page, "4,884,480")
        bar_lora = bar_svg(page)
        shot(page, tmp_path, "method-lora-r16")

        rank = page.locator("#param-r input").first
        rank.fill("8")
        rank.press("Enter")
        wait_for_count(page, "2,442,240")
        page.wait_for_function("old => document.querySelector('#memory-bar').innerHTML !== old",
                               arg=bar_lora, timeout=30_000)
        assert "Σ r × (in + out) = 30 × (8 × (576 + 576)" in page.locator("#method-formula").inner_text()

        choose(page, "method-choice", "IA3")
        wait_for_count(page, "57,600")
        assert re.search(r"Estimated training memory: [\d.]+ GiB", page.locator("#memory-total").inner_text())
        assert "30 × (192 k_proj out + 192 v_proj out + 1536 down_proj in)" in page.locator("#method-formula").inner_text()
        assert bar_svg(page) != bar_lora
        shot(page, tmp_path, "method-ia3")

        # Issue 15 item 7: a verdict for the device the run will use (RAM on a CPU-only machine),
        # and the advisor's table readable: every column inside the panel, none cut off.
        total = page.locator("#memory-total").inner_text()
        assert re.search(r"(fits|tight|exceeds).* of (RAM|GPU)", total), total
        page.locator("#advisor").get_by_text("Advisor: which method for me?").click()
        page.locator("#advisor-run").click()
        # Gradio 6 draws a Dataframe as div rows and grid cells.
        page.wait_for_function("() => document.querySelectorAll('#advisor-table [role=gridcell]').length >= 6",
                               timeout=60_000)
        table = page.locator("#advisor-table")
        fit = page.evaluate("""() => {
            const grid = document.querySelector('#advisor-table [role=grid]');
            const cells = [...grid.querySelectorAll('th, [role=gridcell]')];
            return {cells: cells.length, scroll: grid.scrollWidth, client: grid.clientWidth,
                    right: Math.max(...cells.map(c => c.getBoundingClientRect().right)),
                    edge: grid.getBoundingClientRect().right};
        }""")
        # No column cut off: nothing to scroll sideways, every cell ends inside the grid.
        assert fit["cells"] >= 12 and fit["scroll"] <= fit["client"] + 1 and fit["right"] <= fit["edge"] + 1, fit
        assert "no rule applies" not in table.inner_text()
        shot(page, tmp_path, "method-advisor")
