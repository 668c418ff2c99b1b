"""Property tests: whatever a user feeds the importer, it either raises one of our typed
``DataError``s and leaves nothing behind, or stores a valid dataset of canonical rows.

Random bytes go in as .jsonl, .csv, .txt and .json files; random JSON structures (nested
dicts, lists, strings, numbers, null, with keys the detector knows mixed in so the deeper
validation paths run) go in as JSONL lines and as one JSON array.
"""

from __future__ import annotations

import itertools
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from studio.data import DataError, import_dataset, load_dataset_split
from studio.db import Database
from studio.projects import create_project, project_dir

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
KEYS = ["instruction", "input", "output", "response", "prompt", "completion", "question",
        "answer", "messages", "conversations", "role", "content", "from", "value", "text",
        "system"]
ROLES = ["user", "assistant", "system", "human", "gpt", "narrator", "", "USER"]
_names = itertools.count()

# "\ud800" survives json.dumps as an escape but is not storable text: it must be a row error
scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
           | st.text(max_size=20) | st.sampled_from(ROLES) | st.just("lone \ud800"))
keys = st.sampled_from(KEYS) | st.text(max_size=8) | st.just("\udfff")
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=25)
turn = st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": scalars})
records = st.one_of(
    st.dictionaries(keys, json_values, max_size=5),
    st.fixed_dictionaries({"messages": st.lists(turn, max_size=4)}),
    st.fixed_dictionaries({"instruction": scalars, "output": scalars}),
    json_values)
byte_blobs = st.one_of(
    st.binary(max_size=3000),
    st.text(max_size=1500).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.lists(st.sampled_from([b"{", b"}", b"[", b"]", b",", b'"', b"\n", b"\r\n", b":", b"a",
                              b"\xff", b"\x00", b"\t", b"prompt", b"completion"]),
             max_size=200).map(b"".join))


def check(tmp_path, data: bytes, suffix: str, text_mode: str, on_invalid: str) -> None:
    """Import ``data``; assert the outcome is a typed error with nothing left behind, or a
    dataset whose every stored row is canonical."""
    db = Database(tmp_path / "fuzz.db")
    try:
        project = create_project(db, f"fuzz {next(_names)}")
        path = tmp_path / f"input{suffix}"
        path.write_bytes(data)
        root = project_dir(project) / "datasets"
        try:
            result = import_dataset(db, project, path, text_mode=text_mode,
                                    on_invalid=on_invalid, eval_ratio=0.3)
        except DataError as err:
            assert str(err)  # a message a person can read
            assert not root.exists() or list(root.iterdir()) == []
            assert db.list_datasets(project.id) == []
            return
        assert [p.name for p in root.iterdir()] == [result.folder.name]
        assert {p.name for p in result.folder.iterdir()} == {"train", "eval", "meta.json"}
        row = result.dataset
        assert row.num_train >= 1 and row.num_train + row.num_eval == row.num_rows
        kind = json.loads((result.folder / "meta.json").read_text())["kind"]
        for split, expected in (("train", row.num_train), ("eval", row.num_eval)):
            stored = load_dataset_split(db, row.id, split)
            assert len(stored) == expected
            for example in stored:
                assert_canonical(example, kind)
    finally:
        db.close()


def assert_canonical(example: dict, kind: str) -> None:
    if kind == "text":
        assert set(example) == {"text"}
        assert isinstance(example["text"], str) and example["text"].strip()
        return
    assert kind == "chat" and set(example) == {"messages"}
    turns = example["messages"]
    roles = [t["role"] for t in turns]
    assert all(set(t) == {"role", "content"} for t in turns)
    assert set(roles) <= {"system", "user", "assistant"}
    assert "system" not in roles[1:]
    assert "user" in roles and roles[-1] == "assistant"
    for t in turns:
        assert isinstance(t["content"], str)
        assert t["content"].strip()


policies = st.sampled_from(["drop", "refuse"])
text_modes = st.sampled_from(["line", "block"])


@FUZZ
@given(data=byte_blobs, suffix=st.sampled_from([".jsonl", ".csv", ".txt", ".json"]),
       text_mode=text_modes, on_invalid=policies)
def test_random_bytes(tmp_path, data, suffix, text_mode, on_invalid):
    check(tmp_path, data, suffix, text_mode, on_invalid)


@FUZZ
@given(values=st.lists(records, max_size=8), on_invalid=policies)
def test_random_json_lines(tmp_path, values, on_invalid):
    data = "".join(json.dumps(v) + "\n" for v in values).encode()
    check(tmp_path, data, ".jsonl", "line", on_invalid)


@FUZZ
@given(values=st.lists(records, max_size=8) | records, on_invalid=policies)
def test_random_json_document(tmp_path, values, on_invalid):
    check(tmp_path, json.dumps(values).encode(), ".json", "line", on_invalid)


@FUZZ
@given(rows=st.lists(st.lists(st.text(max_size=12) | st.integers().map(str), min_size=1,
                              max_size=4), max_size=8),
       header=st.lists(st.sampled_from(KEYS) | st.text(max_size=6), min_size=1, max_size=4),
       on_invalid=policies)
def test_random_csv_tables(tmp_path, rows, header, on_invalid):
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    data = buffer.getvalue().encode("utf-8", "surrogatepass")
    check(tmp_path, data, ".csv", "line", on_invalid)
