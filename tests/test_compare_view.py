"""The Compare tab's session state: per-column histories, settings table, frames (no model needed)."""

from __future__ import annotations

import pandas as pd
import pytest

from studio.compare.settings import ColumnAnswer, GenerationSettings
from studio.ui import compare_view as view


def state_with(*labels):
    st = view.empty_state()
    for label in labels:
        st = view.with_column(st, label)
    return st


def test_a_message_goes_to_shown_columns_only_and_each_keeps_its_history():
    st = state_with("a", "b")
    st, conversations = view.with_user_message(st, ["Base model", "b"], "hi")
    assert set(conversations) == {"__base__", "b"}
    assert st["histories"]["a"] == []
    st = view.with_answers(st, {"__base__": ColumnAnswer("__base__", "hello", 3, 0.5, "batched"),
                                "b": ColumnAnswer("b", "yo", 1, 0.25, "switched", stopped=True)})
    st, conversations = view.with_user_message(st, ["Base model", "b"], "again")
    assert [m["content"] for m in conversations["b"]] == ["hi", "yo", "again"]
    # Plain words for how a column is answered (issue 15 item 10: "switched" was jargon).
    assert st["stats"]["b"] == "**answered on its own** · 1 tokens · 0.25 s · 4.0 tokens/s · stopped"
    assert "batched" not in st["stats"]["Base model"]
    frames = view.chat_frames(st, {"b": "partial"})
    assert frames[2][-1] == {"role": "assistant", "content": "partial"} and frames[1] == []
    assert len(frames) == view.SLOTS and frames[3] == []
    assert view.cleared(st)["histories"] == {"Base model": [], "a": [], "b": []}


def test_per_column_settings_read_the_table_and_name_the_bad_row():
    shared = view.settings_from("greedy", 0.7, 0.9, 64, 0)
    table = view.settings_table(["Base model", "b"], shared)
    table.loc[1, ["decoding", "temperature", "seed"]] = ["sampling", 1.2, 5]
    settings = view.per_column_settings(["Base model", "b"], shared, table)
    assert settings["__base__"] == shared
    assert settings["b"] == GenerationSettings(sample=True, temperature=1.2, top_p=0.9, max_new_tokens=64, seed=5)
    table.loc[1, "decoding"] = "beam"
    with pytest.raises(ValueError, match=r"row 2 \(b\): decoding must be greedy or sampling"):
        view.per_column_settings(["Base model", "b"], shared, table)
    bad = pd.DataFrame([["b", "sampling", 0, 0.9, 64, 0]], columns=view.SETTING_COLUMNS)
    with pytest.raises(ValueError, match=r"row 1 \(b\).*temperature"):
        view.per_column_settings(["b"], shared, bad)
    with pytest.raises(ValueError, match="max new tokens"):
        view.settings_from("greedy", 0.7, 0.9, 0, 0)


def test_disk_columns_get_unique_labels(tmp_path):
    st = view.empty_state()
    label, path, method = view.disk_column(str(tmp_path / "my-adapter"), st)
    assert label == "folder my-adapter" and method is None and path == tmp_path / "my-adapter"
    st = view.with_column(st, label)
    assert view.disk_column(str(tmp_path / "my-adapter"), st)[0] == "folder my-adapter (2)"


def test_the_answers_table_shows_each_row_and_marks_matches_by_the_scores_rule():
    """Exact match was a percentage only; the table shows what each column answered."""
    from studio.evaluate import TaskScore

    results = {"__base__": TaskScore("t", "eval", 2, 1, 0.1, ["4", "five  \n"]),
               "lora": TaskScore("t", "eval", 2, 2, 0.1, ["4", "5"])}
    table = view.answers_table(["2+2?", "2+3?"], ["4", "5"], results, lambda a, e: a.strip() == e)
    assert list(table.columns) == ["prompt", "expected", "Base model", "lora"]
    assert list(table["Base model"]) == ["✓ 4", "✗ five"] and list(table["lora"]) == ["✓ 4", "✓ 5"]
    long = view.answers_table(["p"] * 30, ["e"] * 30, {"lora": TaskScore("t", "eval", 30, 0, 0.1, ["x" * 500] * 30)},
                              lambda a, e: False)
    assert len(long) == view.ROWS_SHOWN and len(long["lora"][0]) == len("✗ ") + view.CELL_CHARS
