"""A number Python cannot read (an integer of more than 4,300 digits) costs its row, not the
import: dropped or refused with file, line (or record) and field, in the real import path
(``import_dataset``) and the preview (``inspect_source``). Huge floats, NaN and Infinity
literals are row problems too, never a crash. Issue 12, item 10."""

from __future__ import annotations

import csv
import json

import pytest

from studio.data import import_dataset, inspect_source

from data_helpers import db, project, assert_nothing_written, rows, refused  # noqa: F401 (fixtures)

BIG = "9" * 5000
HUGE = "a number with 5,000 digits (more than the 4,300 a number may have)"
GOOD = [json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) for i in range(3)]
BAD = '{"instruction": "q", "output": "a", "id": %s}' % BIG


def _files(tmp_path):
    """name -> (text, unit, row of the bad record): the three ways a JSON file holds rows."""
    return {
        "rows.jsonl": ("\n".join([GOOD[0], BAD, GOOD[1], GOOD[2]]) + "\n", "line", 2),
        "array.json": ("[\n" + ",\n".join([GOOD[0], GOOD[1], BAD, GOOD[2]]) + "\n]\n",
                       "record", 3),
        "object.json": ('{"data": [' + ", ".join([BAD, *GOOD]) + "]}", "record", 1),
        # JSONL saved as .json whose first line holds the number: still read as JSONL
        "lines.json": ("\n".join([BAD, *GOOD]) + "\n", "line", 1),
    }


@pytest.mark.parametrize("name", ["rows.jsonl", "array.json", "object.json", "lines.json"])
def test_a_huge_integer_costs_its_row_not_the_import(db, project, tmp_path, name):
    text, unit, row = _files(tmp_path)[name]
    (tmp_path / name).write_text(text)
    where = f"{name}, {unit} {row}, field 'id': {HUGE}; put it in quotes to keep it as text"

    err = refused(db, project, tmp_path / name)
    assert str(err).startswith(where) and (err.file, err.row, err.field) == (name, row, "id")
    assert err.code == "huge_number"

    result = import_dataset(db, project, tmp_path / name, eval_ratio=0)
    assert result.dataset.num_train == 3
    assert sorted(r["messages"][0]["content"] for r in rows(db, result)) == ["q0", "q1", "q2"]
    assert [e.render() for e in result.report.errors.kept] == [where]
    assert result.meta["validation"]["dropped"][0]["field"] == "id"
    assert f"1 x huge number ({unit} {row})" in result.report.summary()

    preview = inspect_source(tmp_path / name)
    assert len(preview.rows) == 3 and preview.detection.format == "alpaca"
    assert [p.render() for p in preview.problems] == [where]


def test_huge_integers_nested_in_a_conversation_or_alone_on_a_line(db, project, tmp_path):
    ok = json.dumps({"messages": [{"role": "user", "content": "a"},
                                  {"role": "assistant", "content": "b"}]})
    nested = ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", '
              '"content": %s}]}' % BIG)
    (tmp_path / "chat.jsonl").write_text("\n".join([ok, nested, BIG, "-" + BIG, ok]) + "\n")
    result = import_dataset(db, project, tmp_path / "chat.jsonl", eval_ratio=0)
    assert result.dataset.num_train == 2
    assert [e.render() for e in result.report.errors.kept] == [
        f"chat.jsonl, line 2, field 'messages': {HUGE} in item 2, key 'content'; put it in "
        "quotes to keep it as text",
        f"chat.jsonl, line 3: expected a JSON object ({{...}}) but found {HUGE}",
        f"chat.jsonl, line 4: expected a JSON object ({{...}}) but found {HUGE}"]

    # a CSV carries a conversation as JSON text: the number is a wrong type, named in its row
    with open(tmp_path / "chat.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerows([["messages"], [json.dumps(json.loads(ok)["messages"])],
                          [nested[len('{"messages": '):-1]]])
    result = import_dataset(db, project, tmp_path / "chat.csv", eval_ratio=0)
    assert result.dataset.num_train == 1
    assert [e.render() for e in result.report.errors.kept] == [
        f"chat.csv, row 2, field 'messages': message 2 (assistant): wrong type: expected text, "
        f"found {HUGE}"]


def test_huge_floats_nan_and_infinity_are_row_problems(db, project, tmp_path):
    lines = [GOOD[0], '{"instruction": "q", "output": 1e999999}',
             '{"instruction": "q", "output": NaN}', '{"instruction": "q", "output": -Infinity}',
             '{"instruction": "q", "output": 1.%s}' % BIG, GOOD[1]]
    (tmp_path / "floats.jsonl").write_text("\n".join(lines) + "\n")
    result = import_dataset(db, project, tmp_path / "floats.jsonl", eval_ratio=0)
    assert result.dataset.num_train == 3  # the long float reads as 2.0, used as text with a warning
    assert [e.render() for e in result.report.errors.kept] == [
        "floats.jsonl, line 2, field 'output': wrong type: expected text, found the number inf",
        "floats.jsonl, line 3, field 'output': no value (NaN; expected non-empty text)",
        "floats.jsonl, line 4, field 'output': wrong type: expected text, found the number -inf"]
    preview = inspect_source(tmp_path / "floats.jsonl")
    assert len(preview.rows) == 6 and preview.problems == []
