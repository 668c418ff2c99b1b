"""The Data tab as a newcomer meets it (issue 15 item 10): one max length default shared with the
run, and a failed Inspect that leaves nothing of the previous file behind."""

from __future__ import annotations

import gradio as gr

from studio.runspec import RunSpec
from studio.ui import data_tab, labels


def test_every_max_length_widget_starts_at_the_runs_default(db):
    """Preview 512, import 1024, Train and Method 256 were four defaults for one idea. (The
    bake-off's budget is its own, deliberately short setting.)"""
    from studio.ui.app import build_app

    demo = build_app(db)
    lengths = [(block.label, block.elem_id, block.value) for block in demo.blocks.values()
               if isinstance(block, gr.Number) and block.label and block.elem_id != "bakeoff-max-length"
               and ("max length" in block.label.lower() or "max tokens" in block.label.lower())]
    assert {label for label, _, _ in lengths} >= {labels.DATA["max_len"], labels.DATA["max_tokens"]}
    assert len(lengths) == 4 and {value for _, _, value in lengths} == {RunSpec().max_length}, lengths


def test_a_failed_inspect_clears_the_previous_mapping(tmp_path):
    good = tmp_path / "qa.jsonl"
    good.write_text('{"instruction": "say hi", "output": "hi"}\n' * 3, encoding="utf-8")
    first = data_tab.inspect(None, str(good), "line")
    slots = first[3:3 + data_tab.SLOT_COUNT]
    assert any(s.get("visible") and s.get("value") for s in slots)  # the mapping is on screen
    assert first[-1]["source"] == str(good)

    failed = data_tab.inspect(None, str(tmp_path / "missing.jsonl"), "line")
    assert failed[0].startswith(labels.DATA["cannot_read"].split("{")[0])
    assert failed[1].empty
    for slot in failed[3:3 + data_tab.SLOT_COUNT]:
        assert slot.get("visible") is False and slot.get("value") == ""
    # The state says why there is nothing to import, so Import does not say "Inspect a file first".
    assert "source" not in failed[-1] and failed[-1]["failed"]


def test_a_typed_path_wins_over_the_uploaded_file(tmp_path):
    """An upload clears the path box (see ``data_tab.build``), so a path that is there was typed
    after the upload: Inspect reads it (the upload used to win while it stayed on screen)."""
    uploaded = tmp_path / "uploaded.jsonl"
    uploaded.write_text('{"instruction": "a", "output": "b"}\n', encoding="utf-8")
    typed = tmp_path / "typed.jsonl"
    typed.write_text('{"prompt": "a", "completion": "b"}\n', encoding="utf-8")
    assert data_tab.inspect(str(uploaded), str(typed), "line")[-1]["source"] == str(typed)
    assert data_tab.inspect(str(uploaded), "  ", "line")[-1]["source"] == str(uploaded)
