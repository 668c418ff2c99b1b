"""Importing users' datasets: every format end to end, every broken case with its exact message.

Real files (``tests/assets/data/``, big ones generated here), real SQLite, no mocks. A broken
import must leave nothing behind: no folder under the project's ``datasets/`` and no row.
"""

from __future__ import annotations

import json
import random
import tracemalloc
from pathlib import Path

import pytest

from studio.data import (DataError, EmptyFileError, FormatError, UnreadableFileError,
                         ValidationError, import_dataset, import_sample_task, load_dataset_split)
from studio.db import Database
from studio.projects import create_project, project_dir
from studio.samples import get_task, load_rows, prompt_text

DATA = Path(__file__).parent / "assets" / "data"


@pytest.fixture
def db(tmp_path):
    database = Database(tmp_path / "studio.db")
    yield database
    database.close()


@pytest.fixture
def project(db):
    return create_project(db, "Data test")


def stored(project) -> list[str]:
    """Everything under the project's datasets/ (temporary folders included)."""
    root = project_dir(project) / "datasets"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def assert_nothing_written(db, project) -> None:
    assert stored(project) == []
    assert db.list_datasets(project.id) == []


def rows(db, result, split="train") -> list[dict]:
    return load_dataset_split(db, result.dataset.id, split).to_list()


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def refused(db, project, path, error=ValidationError, **kw) -> DataError:
    with pytest.raises(error) as info:
        import_dataset(db, project, path, on_invalid="refuse", **kw)
    assert_nothing_written(db, project)
    return info.value


# ---- every format, good ------------------------------------------------------------------------

def test_alpaca_jsonl_imports_detects_normalises_and_splits(db, project):
    result = import_dataset(db, project, DATA / "alpaca.jsonl", eval_ratio=0.25, seed=1)
    assert not result.reused
    assert (result.detection.format, result.detection.confidence) == ("alpaca", 0.99)
    assert result.detection.mapping == {"instruction": "instruction", "input": "input",
                                        "output": "output"}
    row = result.dataset
    assert (row.format, row.num_rows, row.num_train, row.num_eval) == ("alpaca", 20, 15, 5)
    assert row.source_hash and row.stats["kind"] == "chat" and row.stats["confidence"] == 0.99
    folder = project_dir(project) / "datasets" / row.folder
    assert folder == result.folder and stored(project) == [row.folder]
    assert {p.name for p in folder.iterdir()} == {"train", "eval", "meta.json"}
    train, evals = rows(db, result), rows(db, result, "eval")
    everything = train + evals
    assert len(everything) == 20 and not any(r in evals for r in train)
    assert chat(("user", "Translate to French.\n\nGood morning"),
                ("assistant", "Bonjour")) in everything
    assert chat(("user", "Add 1 and 2."), ("assistant", "3")) in everything  # empty input
    assert all(set(r) == {"messages"} for r in everything)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["source_hash"] == row.source_hash and meta["kind"] == "chat"
    assert meta["format"] == "alpaca" and meta["rows"] == {"total": 20, "usable": 20,
                                                           "train": 15, "eval": 5}
    assert meta["source_path"] == str((DATA / "alpaca.jsonl").resolve())
    # the same seed gives the same split in another project; another seed another one
    other = create_project(db, "Other")
    again = import_dataset(db, other, DATA / "alpaca.jsonl", eval_ratio=0.25, seed=1)
    assert rows(db, again, "eval") == evals
    third = import_dataset(db, other, DATA / "alpaca.jsonl", eval_ratio=0.25, seed=2)
    assert rows(db, third, "eval") != evals


def test_json_array_of_messages(db, project):
    result = import_dataset(db, project, DATA / "messages.json", eval_ratio=0)
    assert result.detection.format == "messages" and result.detection.confidence >= 0.9
    assert (result.dataset.num_train, result.dataset.num_eval) == (10, 0)
    train = rows(db, result)
    assert train[0] == chat(("system", "You are terse."), ("user", "Capital of France?"),
                            ("assistant", "Paris."))
    assert train[2] == chat(("user", "Count to 2."), ("assistant", "1 2"), ("user", "Thanks!"),
                            ("assistant", "You're welcome."))
    assert rows(db, result, "eval") == []


def test_csv_with_quoted_newlines_commas_and_quotes(db, project):
    result = import_dataset(db, project, DATA / "prompt_completion.csv", eval_ratio=0.5)
    assert result.detection.format == "prompt_completion"
    assert result.detection.confidence >= 0.9
    assert (result.dataset.num_train, result.dataset.num_eval) == (6, 6)
    everything = rows(db, result) + rows(db, result, "eval")
    assert chat(("user", "Write a haiku about rain,\nin three lines"),
                ("assistant", 'Soft rain on the roof,\n"drip, drip" says the gutter,\n'
                              "sleep comes easily")) in everything
    assert chat(("user", 'Quote "this"'), ("assistant", 'He said "yes", then left.')) \
        in everything
    assert chat(("user", "What is 12 squared?"), ("assistant", "144")) in everything


def test_tsv_question_answer_aliases(db, project):
    result = import_dataset(db, project, DATA / "qa.tsv", eval_ratio=0.25)
    det = result.detection
    assert det.format == "prompt_completion" and 0.5 <= det.confidence < 0.99
    assert det.mapping == {"prompt": "question", "completion": "answer"}
    assert (result.dataset.num_train, result.dataset.num_eval) == (6, 2)
    everything = rows(db, result) + rows(db, result, "eval")
    assert chat(("user", "Spell horse backwards."), ("assistant", "esroh")) in everything


def test_parquet(db, project, tmp_path):
    import pandas as pd

    path = tmp_path / "squares.parquet"
    pd.DataFrame({"instruction": [f"Square {i}." for i in range(8)],
                  "input": [""] * 8, "output": [str(i * i) for i in range(8)],
                  "id": list(range(8))}).to_parquet(path)
    result = import_dataset(db, project, path, eval_ratio=0)
    assert result.detection.format == "alpaca" and result.dataset.num_train == 8
    assert rows(db, result)[3] == chat(("user", "Square 3."), ("assistant", "9"))


def test_text_line_and_block_modes(db, project):
    lines = import_dataset(db, project, DATA / "pretrain.txt", eval_ratio=0)
    assert (lines.detection.format, lines.detection.confidence) == ("text", 1.0)
    assert lines.dataset.stats["kind"] == "text"
    assert rows(db, lines) == [{"text": "The quick brown fox jumps over the lazy dog."},
                               {"text": "A second sentence on its own line."},
                               {"text": "Paragraph two starts here"},
                               {"text": "and continues on a second line."},
                               {"text": "Last paragraph, one line."}]
    blocks = import_dataset(db, project, DATA / "pretrain.txt", text_mode="block", eval_ratio=0)
    assert not blocks.reused  # other options, other result
    assert rows(db, blocks) == [
        {"text": "The quick brown fox jumps over the lazy dog.\n"
                 "A second sentence on its own line."},
        {"text": "Paragraph two starts here\nand continues on a second line."},
        {"text": "Last paragraph, one line."}]
    assert len(db.list_datasets(project.id)) == 2 and len(stored(project)) == 2


def test_saved_dataset_folder(db, project, tmp_path):
    import datasets

    data = {"prompt": [f"Name {i}" for i in range(6)], "completion": [f"N{i}" for i in range(6)]}
    datasets.Dataset.from_dict(data).save_to_disk(str(tmp_path / "saved"))
    result = import_dataset(db, project, tmp_path / "saved", eval_ratio=0)
    assert result.detection.format == "prompt_completion" and result.dataset.num_train == 6
    assert rows(db, result)[5] == chat(("user", "Name 5"), ("assistant", "N5"))
    assert result.meta["file_kind"] == "folder"
    # a DatasetDict folder: its train split is used
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(data),
                          "test": datasets.Dataset.from_dict(data).select(range(2))}
                         ).save_to_disk(str(tmp_path / "saved_dict"))
    result = import_dataset(db, project, tmp_path / "saved_dict", eval_ratio=0)
    assert result.dataset.num_train == 6 and "'train' split" in result.meta["file_note"]


def test_sharegpt_from_value(db, project):
    result = import_dataset(db, project, DATA / "sharegpt.jsonl", eval_ratio=0)
    assert result.detection.format == "messages" and result.detection.confidence >= 0.9
    assert "ShareGPT" in result.detection.evidence
    assert result.detection.mapping == {"messages": "conversations"}
    train = rows(db, result)
    assert train[0] == chat(("system", "Be kind."), ("user", "Hello!"),
                            ("assistant", "Hi, how can I help?"))
    assert train[9] == chat(("user", "What is 10 + 10?"), ("assistant", "20"))


def test_mapping_override_for_an_unknown_layout(db, project, tmp_path):
    path = tmp_path / "custom.jsonl"
    path.write_text("".join(json.dumps({"q": f"Q{i}", "a": f"A{i}", "sys": "Be brief."}) + "\n"
                            for i in range(4)))
    with pytest.raises(FormatError, match=r"^custom.jsonl: could not recognise the layout"):
        import_dataset(db, project, path)
    with pytest.raises(FormatError, match=r"mapping 'assistant' -> 'nope': no such column"):
        import_dataset(db, project, path, mapping={"user": "q", "assistant": "nope"})
    assert_nothing_written(db, project)
    result = import_dataset(db, project, path, eval_ratio=0,
                            mapping={"user": "q", "assistant": "a", "system": "sys"})
    assert result.dataset.format == "prompt_completion"
    assert rows(db, result)[1] == chat(("system", "Be brief."), ("user", "Q1"),
                                       ("assistant", "A1"))


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


# ---- re-import, samples, atomicity ----------------------------------------------------------

def test_reimport_of_the_same_content_is_recognised(db, project, tmp_path):
    first = import_dataset(db, project, DATA / "alpaca.jsonl")
    copy = tmp_path / "renamed.jsonl"
    copy.write_bytes((DATA / "alpaca.jsonl").read_bytes())
    for source in (DATA / "alpaca.jsonl", copy):
        again = import_dataset(db, project, source)
        assert again.reused and again.dataset.id == first.dataset.id
        assert again.folder == first.folder
    assert len(db.list_datasets(project.id)) == 1 and len(stored(project)) == 1


def test_sample_task(db, project):
    result = import_sample_task(db, project, "dates")
    assert (result.dataset.num_train, result.dataset.num_eval) == (400, 50)
    assert result.dataset.format == "alpaca"
    first = load_rows(get_task("dates"), "eval")[0]
    assert rows(db, result, "eval")[0] == chat(("user", prompt_text(first)),
                                               ("assistant", first["output"]))
    assert import_sample_task(db, project, "dates").reused


def test_failed_row_insert_removes_the_folder(db, project):
    db.delete_project(project.id)  # the folder stays; adding the dataset row now fails
    with pytest.raises(LookupError):
        import_dataset(db, project, DATA / "alpaca.jsonl")
    assert stored(project) == []


def test_names_never_become_paths(db, project):
    result = import_dataset(db, project, DATA / "alpaca.jsonl", name="../../etc/passwd")
    assert result.dataset.name == "../../etc/passwd"
    assert result.folder.parent == project_dir(project) / "datasets"
    assert result.folder.name.startswith("etc-passwd-")


def test_missing_file_offline_hub_and_bad_split(db, project):
    with pytest.raises(UnreadableFileError, match=r"^nothere.jsonl: file not found"):
        import_dataset(db, project, "nothere.jsonl")
    with pytest.raises(UnreadableFileError, match=r"^tatsu-lab/alpaca: .*offline"):
        import_dataset(db, project, "tatsu-lab/alpaca")
    assert_nothing_written(db, project)
    result = import_dataset(db, project, DATA / "alpaca.jsonl")
    with pytest.raises(ValueError):
        load_dataset_split(db, result.dataset.id, "test")
