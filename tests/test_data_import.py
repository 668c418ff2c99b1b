"""Importing every supported format, re-imports, sample tasks and atomicity."""


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

from data_helpers import DATA, db, project, stored, assert_nothing_written, rows, chat, refused  # noqa: F401 (fixtures)


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
