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
