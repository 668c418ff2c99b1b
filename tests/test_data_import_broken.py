"""Importing broken files: exact row-numbered messages, nothing left behind on refusal,
rows dropped with a report on "drop"."""

from __future__ import annotations

import json
import random
import tracemalloc

import pytest

from studio.data import EmptyFileError, FormatError, UnreadableFileError, import_dataset

from data_helpers import DATA, db, project, assert_nothing_written, rows, chat, refused  # noqa: F401 (fixtures)


# ---- broken files: exact messages, nothing left behind with "refuse", rows dropped with "drop" --

def test_bad_utf8_in_the_middle_of_a_jsonl(db, project):
    err = refused(db, project, DATA / "bad_utf8.jsonl")
    assert str(err).startswith("bad_utf8.jsonl, line 3: not valid UTF-8 (byte 0xe9 at byte "
                               "offset 117); save the file as UTF-8")
    result = import_dataset(db, project, DATA / "bad_utf8.jsonl", eval_ratio=0)
    assert result.dataset.num_train == 4
    assert [e.row for e in result.report.errors.kept] == [3]
    assert result.meta["validation"]["dropped"][0]["row"] == 3
    assert "Echo three." not in json.dumps(rows(db, result))


def test_truncated_json_line(db, project):
    err = refused(db, project, DATA / "truncated.jsonl")
    assert str(err).startswith("truncated.jsonl, line 7: truncated JSON (Expecting ',' "
                               "delimiter at column 31)")
    assert err.row == 7 and err.report.error_count == 1
    result = import_dataset(db, project, DATA / "truncated.jsonl", eval_ratio=0)
    assert result.dataset.num_train == 9
    assert result.report.errors.kept[0].render() == \
        "truncated.jsonl, line 7: truncated JSON (Expecting ',' delimiter at column 31)"
    assert "line 7" in result.report.summary()


def test_empty_files(db, project, tmp_path):
    err = refused(db, project, DATA / "empty.jsonl", EmptyFileError)
    assert str(err) == "empty.jsonl: the file is empty (0 bytes)"
    (tmp_path / "blank.csv").write_text("\n  \n")
    err = refused(db, project, tmp_path / "blank.csv", EmptyFileError)
    assert str(err) == "blank.csv: the file is empty (only whitespace)"
    (tmp_path / "header.csv").write_text("prompt,completion\n")
    err = refused(db, project, tmp_path / "header.csv", EmptyFileError)
    assert str(err) == "header.csv: the file holds a header but no data rows"


def test_missing_columns(db, project):
    err = refused(db, project, DATA / "alpaca_no_output.jsonl", FormatError, format="alpaca")
    assert str(err) == ("alpaca_no_output.jsonl, field 'output': format 'alpaca' needs a column "
                        "'output' (or 'response') holding the answer to learn; the file has "
                        "columns: 'instruction', 'input'")
    err = refused(db, project, DATA / "alpaca_no_output.jsonl", FormatError)
    assert "could not recognise the layout" in str(err)
    assert "closest is alpaca, which also needs a column 'output' or 'response'" in str(err)


def test_csv_empty_value_names_row_and_field(db, project, tmp_path):
    lines = ["instruction,input,output"] + [f"Say {i},,{i}" for i in range(1, 15)]
    lines[12] = "Say 12,,"  # data row 12 (line 13 of the file: the header is not counted)
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    err = refused(db, project, tmp_path / "train.csv")
    assert str(err).startswith("train.csv, row 12, field 'output': empty value (expected "
                               "non-empty text)")
    assert "header" in err.report.summary()


def test_csv_row_with_too_many_fields(db, project):
    err = refused(db, project, DATA / "too_many_fields.csv")
    assert str(err).startswith("too_many_fields.csv, row 3: expected 2 fields (prompt, "
                               "completion) but found 3; a field that contains a comma must be "
                               "inside double quotes")
    result = import_dataset(db, project, DATA / "too_many_fields.csv", eval_ratio=0)
    assert [r["messages"][0]["content"] for r in rows(db, result)] == ["Say hi", "Say bye",
                                                                       "Say yes"]
    assert result.report.errors.kept[0].code == "field_count"


def test_binary_garbage(db, project, tmp_path):
    err = refused(db, project, DATA / "png_renamed.jsonl", UnreadableFileError)
    assert str(err) == "png_renamed.jsonl: this is not a text file: it looks like a PNG image"
    with pytest.raises(UnreadableFileError):  # dropping rows cannot rescue a binary file
        import_dataset(db, project, DATA / "png_renamed.jsonl", on_invalid="drop")
    assert_nothing_written(db, project)
    noise = random.Random(3)
    for name in ("noise.jsonl", "noise.csv", "noise.txt"):
        (tmp_path / name).write_bytes(bytes(noise.randrange(1, 256) for _ in range(5000)))
        err = refused(db, project, tmp_path / name, UnreadableFileError)
        assert str(err).startswith(f"{name}: this looks like a binary file, not UTF-8 text "
                                   "(first bad byte 0x")


def test_unknown_roles(db, project):
    err = refused(db, project, DATA / "unknown_roles.jsonl")
    assert str(err).startswith("unknown_roles.jsonl, line 2, field 'messages': unknown role "
                               "'narrator' in message 2 (valid roles: system, user, assistant; "
                               "ShareGPT's human and gpt are accepted too)")
    result = import_dataset(db, project, DATA / "unknown_roles.jsonl", eval_ratio=0)
    assert rows(db, result) == [chat(("user", "Hi"), ("assistant", "Hello")),
                                chat(("user", "Bye"), ("assistant", "Goodbye"))]


def test_empty_and_unfinished_conversations(db, project):
    err = refused(db, project, DATA / "empty_conversations.jsonl")
    assert str(err).startswith("empty_conversations.jsonl, line 2, field 'messages': empty "
                               "conversation (no messages) (3 invalid rows in all")
    result = import_dataset(db, project, DATA / "empty_conversations.jsonl", eval_ratio=0)
    assert rows(db, result) == [chat(("user", "Hi"), ("assistant", "Hello"))]
    texts = [e.render() for e in result.report.errors.kept]
    assert texts == [
        "empty_conversations.jsonl, line 2, field 'messages': empty conversation (no messages)",
        "empty_conversations.jsonl, line 3, field 'messages': the conversation has no "
        "assistant turn (nothing to learn)",
        "empty_conversations.jsonl, line 4, field 'messages': the conversation ends with a "
        "user turn; it must end with an assistant turn (the answer to learn)"]


def test_duplicates_are_counted_not_dropped(db, project):
    result = import_dataset(db, project, DATA / "duplicates.jsonl", eval_ratio=0)
    assert result.dataset.num_train == 6 and result.report.duplicates == 3
    notice = result.report.warnings["duplicates"]
    assert notice.count == 3 and notice.rows == [4, 5, 6]
    assert "line 4 repeats line 1, line 5 repeats line 2, line 6 repeats line 1" \
        in notice.message
    assert result.dataset.stats["duplicates"] == 3


def test_numbers_become_text_with_a_warning_and_lists_are_errors(db, project, tmp_path):
    path = tmp_path / "types.jsonl"
    path.write_text('{"prompt": "2+3?", "completion": 5}\n'
                    '{"prompt": ["a"], "completion": "x"}\n'
                    '{"prompt": "ok?", "completion": true}\n')
    result = import_dataset(db, project, path, eval_ratio=0)
    assert rows(db, result) == [chat(("user", "2+3?"), ("assistant", "5")),
                                chat(("user", "ok?"), ("assistant", "true"))]
    assert result.report.warnings["coerced"].rows == [1, 3]
    assert result.report.errors.kept[0].render() == ("types.jsonl, line 2, field 'prompt': "
                                                     "wrong type: expected text, found a list")


def test_long_rows_warned_or_dropped(db, project, tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"text": "word " * n}) + "\n" for n in (5, 50, 500)))
    words = lambda texts: [len(t.split()) for t in texts]  # noqa: E731 - a stand-in tokenizer
    kept = import_dataset(db, project, path, eval_ratio=0, max_tokens=40, token_counter=words)
    assert kept.dataset.num_train == 3 and kept.report.warnings["too_long"].rows == [2, 3]
    assert "tokenizer" in kept.report.length_method
    dropped = import_dataset(db, project, path, eval_ratio=0, max_tokens=40, on_long="drop")
    # estimated as characters / 4: 5 words (25 chars) ~ 7 tokens stay; 50 and 500 words go
    assert rows(db, dropped) == [{"text": "word " * 5}]
    assert dropped.report.dropped_long == 2
    assert "characters / 4" in dropped.report.summary()


def test_big_jsonl_streams_in_bounded_memory(db, project, tmp_path):
    path = tmp_path / "big.jsonl"
    line = {"instruction": "Summarise the text.", "input": "lorem ipsum " * 70, "output": ""}
    count = 0
    with path.open("w") as handle:
        while handle.tell() < 50 * 2**20:
            count += 1
            line["output"] = f"summary {count}"
            handle.write(json.dumps(line) + "\n")
    size = path.stat().st_size
    tracemalloc.start()
    try:
        result = import_dataset(db, project, path, eval_ratio=0.01)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.report.total_rows == count and result.dataset.num_rows == count
    assert result.dataset.num_eval == round(count * 0.01)
    # Python-side memory stays a small fraction of the file: it was never loaded whole
    assert peak < size / 4, f"peak {peak / 2**20:.1f} MB for a {size / 2**20:.0f} MB file"


def test_json_array_errors_name_the_line(db, project, tmp_path):
    recs = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(30)]
    lines = json.dumps(recs, indent=1).split("\n")
    lines[48] = " }"  # the comma after record 12 is gone; record 13 opens on line 50
    (tmp_path / "broken.json").write_text("\n".join(lines))
    err = refused(db, project, tmp_path / "broken.json", FormatError)
    assert str(err) == ("broken.json, line 50: invalid JSON (expected ',' or ']' after record "
                        "12, found '{')")
    (tmp_path / "bad.json").write_bytes(json.dumps(recs, indent=1).encode()
                                        .replace(b"p17", b"p\xff7"))
    err = refused(db, project, tmp_path / "bad.json", UnreadableFileError)
    assert str(err).startswith("bad.json: not valid UTF-8 (byte 0xff at line 71, byte offset "
                               "815)")
    (tmp_path / "bad.csv").write_bytes(b"prompt,completion\nhi,there\ncaf\xe9,ok\nyo,yes\n")
    result = import_dataset(db, project, tmp_path / "bad.csv", eval_ratio=0)
    assert result.dataset.num_train == 2 and result.report.errors.kept[0].render() == (
        "bad.csv, row 2: not valid UTF-8 (byte 0xe9 at line 3, byte offset 30); save the file "
        "as UTF-8 (in Excel: 'CSV UTF-8')")


def test_content_settles_the_file_kind_and_preview(db, project, tmp_path):
    lines = "".join(json.dumps({"text": f"note {i}"}) + "\n" for i in range(3))
    for name in ("lines.json", "lines.txt"):
        (tmp_path / name).write_text(lines)
        result = import_dataset(db, project, tmp_path / name, eval_ratio=0)
        assert result.meta["file_kind"] == "jsonl" and "read as JSONL" in result.meta["file_note"]
        assert rows(db, result) == [{"text": f"note {i}"} for i in range(3)]
    (tmp_path / "array.jsonl").write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=2))
    result = import_dataset(db, project, tmp_path / "array.jsonl", eval_ratio=0)
    assert result.meta["file_kind"] == "json" and rows(db, result) == [{"text": "a"},
                                                                     {"text": "b"}]
    from studio.data import inspect_source

    preview = inspect_source(DATA / "truncated.jsonl", head=3)
    assert preview.detection.format == "alpaca" and len(preview.rows) == 3
    assert preview.columns == ["instruction", "output"]
    assert [p.row for p in preview.problems] == [7]
