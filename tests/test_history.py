"""studio.history against real SQLite files and real folders: run summaries that survive a
reopen, filter and sort, the configuration diff, rename / note, delete (rows and files, nothing
else, never outside the runs folder) and clone."""

from __future__ import annotations

import os
import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from studio import history, projects
from studio.db import Database, utcnow
from studio.runspec import RunSpec
from studio.ui import history_view
from studio.runs import launch


def make_run(db: Database, project_id: int, name: str, metrics: dict[str, list[float]] | None = None,
             status: str = "completed", minutes: float = 3.0, **spec_fields):
    """A run created as the Train tab creates it, with metrics recorded as the worker records them."""
    spec = RunSpec(sample_task="dates", **spec_fields)
    run = launch.create_run(db, project_id, spec, name=name)
    for name_, values in (metrics or {}).items():
        for step, value in enumerate(values, start=1):
            db.log_metrics(run.id, step * (10 if name_.startswith("eval") else 1), {name_: value})
    started = utcnow() - timedelta(hours=1)
    return db.update_run(run.id, status=status, started_at=started,
                         finished_at=started + timedelta(minutes=minutes) if status != "running" else None)


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def project(db):
    return projects.create_project(db, "History")


def test_summaries_and_tables_survive_a_reopen_with_the_same_numbers(db, project, studio_home):
    a = make_run(db, project.id, "small lr", {"loss": [2.5, 2.0, 1.5], "eval_loss": [1.9],
                                              "eval_exact_match": [0.25], "peak_memory_bytes": [3e8, 5e8, 4e8],
                                              "memory_bytes": [1e8, 1e8, 1e8]}, learning_rate=1e-4)
    b = make_run(db, project.id, "old run", {"loss": [3.0, float("nan")], "memory_bytes": [2e8, 7e8]},
                 status="failed", minutes=90, batch_size=8, grad_accum=2)
    db.add_dataset(project.id, name="mine", num_rows=10, num_train=9, num_eval=1, format="jsonl")
    export = db.add_export(project.id, "adapter", studio_home / "x", run_id=a.id, dtype="float32")
    db.update_export(export.id, status="verified", size_bytes=5 * 2**20)
    db.update_run(a.id, notes="best so far")

    rows = history.run_summaries(db, project.id)
    assert [r.id for r in rows] == [b.id, a.id]  # newest first
    ra, rb = rows[1], rows[0]
    assert (ra.steps, ra.train_loss, ra.eval_loss, ra.eval_score) == (10, 1.5, 1.9, 0.25)
    assert ra.peak_memory_bytes == 5e8  # the recorded high-water mark, not the last sample
    assert ra.duration_s == 180.0 and ra.notes == "best so far" and ra.status == "completed"
    assert "lr 0.0001" in ra.settings and "r 16" in ra.settings and "lora_alpha 32" in ra.settings
    assert rb.peak_memory_bytes == 7e8  # recorded before peaks were: the largest sample
    db.log_metrics(b.id, 2, {"peak_rss_bytes": 8e8})  # a bake-off's measurement after training
    assert history.run_summaries(db, project.id)[0].peak_memory_bytes == 8e8
    assert rb.eval_loss is None and rb.eval_score is None and rb.train_loss != rb.train_loss  # NaN kept
    assert "batch 8×2" in rb.settings
    rows = history.run_summaries(db, project.id)
    table = history_view.runs_table(rows)
    assert list(table.iloc[1][["train loss", "eval loss", "eval exact match", "duration", "peak memory"]]) == \
        ["1.5000", "1.9000", "25.0%", "3 min 0 s", "477 MiB"]
    assert table.iloc[0]["duration"] == "1 h 30 min" and table.iloc[0]["eval loss"] == "—"
    before = (rows, table, history_view.datasets_table(db, project.id), history_view.exports_table(db, project.id),
              history_view.projects_table(db))
    db.close()

    again = Database()  # a second process-like open of the same file
    try:
        after = (history.run_summaries(again, project.id),)
        after += (history_view.runs_table(after[0]), history_view.datasets_table(again, project.id),
                  history_view.exports_table(again, project.id), history_view.projects_table(again))
        assert repr(after[0]) == repr(before[0])  # repr: NaN != NaN, but prints the same
        for old, new in zip(before[1:], after[1:]):
            assert old.equals(new), (old, new)
        assert list(after[3].iloc[0][["run", "kind", "status", "size"]]) == [f"#{a.id} small lr", "adapter",
                                                                             "verified", "5 MiB"]
        assert list(after[4].iloc[0][["datasets", "runs", "exports"]]) == ["1", "2", "1"]
    finally:
        again.close()


def test_filter_and_sort(db, project):
    a = make_run(db, project.id, "alpha", {"loss": [1.0], "eval_loss": [0.9]}, method="lora")
    b = make_run(db, project.id, "beta", {"loss": [2.0]}, method="ia3", status="failed")
    c = make_run(db, project.id, "gamma", {"loss": [0.5], "eval_loss": [0.4]}, method="dora")
    db.update_run(b.id, notes="Diverged at step 3")
    rows = history.run_summaries(db, project.id)
    ids = lambda rs: [r.id for r in rs]  # noqa: E731
    assert ids(history.filter_runs(rows, "diverged")) == [b.id]
    assert ids(history.filter_runs(rows, f"#{a.id}")) == [a.id]
    assert ids(history.filter_runs(rows, statuses=["completed"])) == [c.id, a.id]
    assert ids(history.filter_runs(rows, methods=["ia3", "dora"])) == [c.id, b.id]
    assert ids(history.filter_runs(rows, "a", statuses=["failed"], methods=["ia3"])) == [b.id]
    assert ids(history.sort_runs(rows, "eval_loss", descending=False)) == [c.id, a.id, b.id]  # no eval: last
    assert ids(history.sort_runs(rows, "eval_loss", descending=True)) == [a.id, c.id, b.id]  # last either way
    assert ids(history.sort_runs(rows, "name", descending=False)) == [a.id, b.id, c.id]
    assert ids(history.sort_runs(rows, "created_at")) == [c.id, b.id, a.id]
    with pytest.raises(history.HistoryError):
        history.sort_runs(rows, "no_such_column")


def test_config_diff_shows_exactly_the_fields_that_differ():
    one = {"method": "lora", "lr": 1e-4, "settings": {"r": 8, "targets": ["q", "v"], "deep": {"x": 1}}, "seed": 1}
    two = {"method": "lora", "lr": 2e-4, "settings": {"r": 8, "targets": ["q", "v"], "deep": {"x": 2}}, "seed": 1}
    three = {"method": "dora", "lr": 1e-4, "settings": {"r": 8, "targets": ["q"]}, "seed": True, "new": None}
    assert history.config_diff([one, one]) == []
    assert history.config_diff([one, two]) == [("lr", [1e-4, 2e-4]), ("settings.deep.x", [1, 2])]
    assert history.config_diff([one, two, three]) == [
        ("method", ["lora", "lora", "dora"]), ("lr", [1e-4, 2e-4, 1e-4]),
        ("settings.targets", [["q", "v"], ["q", "v"], ["q"]]),
        ("settings.deep.x", [1, 2, history.MISSING]), ("seed", [1, 1, True]),  # a switch is not a count
        ("new", [history.MISSING, history.MISSING, None])]
    assert history.config_diff([{"a": 1}, {"a": 1.0}]) == []  # the same number in JSON
    assert history.flatten({"a": {"b": {"c": 1}, "d": [1, {"e": 2}]}}) == {"a.b.c": 1, "a.d": [1, {"e": 2}]}


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from(["x", "y"]))
nested = st.recursive(json_leaf, lambda inner: st.dictionaries(st.sampled_from("abc"), inner, max_size=3),
                      max_leaves=8)
specs = st.lists(st.dictionaries(st.sampled_from("pqr"), nested, max_size=3), min_size=2, max_size=4)


@settings(max_examples=200, deadline=None)
@given(specs)
def test_config_diff_property(dicts):
    flats = [history.flatten(d) for d in dicts]
    diff = dict(history.config_diff(dicts))
    for key in {k for f in flats for k in f}:
        values = [f.get(key, history.MISSING) for f in flats]
        same = all(key in f for f in flats) and all(
            type(v) is type(values[0]) and v == values[0] for v in values)
        assert (key not in diff) == same, (key, values)
        if key in diff:
            assert diff[key] == values


def test_effective_specs_hide_spelled_out_defaults(db, project):
    a = make_run(db, project.id, "a", method_settings={})
    b = make_run(db, project.id, "b", method_settings={"r": 16, "lora_alpha": 32})  # the defaults
    c = make_run(db, project.id, "c", method_settings={"r": 8}, learning_rate=1e-3)
    assert history.run_config_diff(db, [a.id, b.id]) == []
    assert history.run_config_diff(db, [a.id, b.id, c.id]) == [("method_settings.r", [16, 16, 8]),
                                                                ("learning_rate", [2e-4, 2e-4, 1e-3])]
    # A runspec from a newer version (an unknown field) is compared as stored, not refused.
    assert history.effective_spec({"method": "lora", "future": 1}) == {"method": "lora", "future": 1}


def test_rename_and_note_are_kept(db, project):
    run = make_run(db, project.id, "first")
    assert history.rename_run(db, run.id, "  renamed  ").name == "renamed"
    assert history.set_note(db, run.id, "lr too high").notes == "lr too high"
    for bad in ("", "   ", "x" * 121):
        with pytest.raises(history.HistoryError):
            history.rename_run(db, run.id, bad)
    with pytest.raises(history.HistoryError):
        history.set_note(db, run.id, "x" * (history.NOTE_MAX + 1))
    with pytest.raises(history.HistoryError):
        history.rename_run(db, 999, "ghost")
    folder = launch.run_folder(db, db.get_run(run.id))
    assert folder.name.endswith("first") and (folder / "runspec.json").exists()  # the folder keeps its name
    db.close()
    again = Database()
    assert (again.get_run(run.id).name, again.get_run(run.id).notes) == ("renamed", "lr too high")
    again.close()


def count(db: Database, table: str, run_id: int) -> int:
    conn = sqlite3.connect(db.path)
    try:
        return conn.execute(f"SELECT count(*) FROM {table} WHERE run_id = ?", (run_id,)).fetchone()[0]
    finally:
        conn.close()


def test_delete_removes_the_runs_rows_and_files_and_nothing_else(db, project, studio_home):
    a = make_run(db, project.id, "doomed", {"loss": [2.0, 1.0], "eval_loss": [1.5]})
    b = make_run(db, project.id, "kept", {"loss": [2.0, 1.5]})
    for run in (a, b):
        folder = launch.run_folder(db, run)
        (folder / "checkpoints" / "checkpoint-2").mkdir(parents=True)
        (folder / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors").write_bytes(b"w" * 100)
        (folder / launch.LOG_NAME).write_text("step 1\n")
        db.add_checkpoint(run.id, 2, folder / "checkpoints" / "checkpoint-2")
    export_dir = studio_home / "projects" / project.folder / "exports" / "doomed-adapter"
    export_dir.mkdir(parents=True)
    (export_dir / "adapter_model.safetensors").write_bytes(b"e")
    export = db.add_export(project.id, "adapter", export_dir, run_id=a.id)
    dataset = db.add_dataset(project.id, name="d")
    root = studio_home / "projects"
    before = files_under(root)
    b_metrics = [(m.step, m.name, m.value) for m in db.metrics_for(b.id)]
    a_folder = launch.run_folder(db, a)

    removed = history.delete_run(db, a.id)

    assert removed == [str(a_folder)]
    assert db.get_run(a.id) is None
    assert count(db, "metrics", a.id) == 0 and count(db, "checkpoints", a.id) == 0
    a_files = {f for f in before if f.startswith(str(a_folder.relative_to(root)))}
    assert files_under(root) == before - a_files  # exactly the run's folder, nothing else
    assert not any(name.startswith(".deleting") for name in os.listdir(a_folder.parent))
    assert [(m.step, m.name, m.value) for m in db.metrics_for(b.id)] == b_metrics
    assert len(db.list_checkpoints(b.id)) == 1 and db.get_run(b.id) is not None
    kept = db.list_exports(project.id)
    assert [(e.id, e.run_id) for e in kept] == [(export.id, None)]  # the export stays, run forgotten
    assert db.get_dataset(dataset.id) is not None and db.get_project(project.id) is not None
    with pytest.raises(history.HistoryError):
        history.delete_run(db, a.id)


def test_delete_never_leaves_the_runs_folder(db, project, studio_home):
    victim = studio_home / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    escaping = make_run(db, project.id, "escaping")
    for bad in ("../../../victim", "/tmp", "..", str(victim)):
        db.update_run(escaping.id, folder=bad)
        with pytest.raises(history.HistoryError, match="nothing was deleted"):
            history.delete_run(db, escaping.id)
        assert db.get_run(escaping.id) is not None  # refused as a whole: the row stays too
    assert (victim / "precious.txt").read_text() == "keep me"

    # A run folder that is a link (to another run's folder, or outside): only the link goes.
    other = make_run(db, project.id, "other")
    other_folder = launch.run_folder(db, other)
    (other_folder / "weights.bin").write_bytes(b"x")
    for target in (other_folder, victim):
        linked = make_run(db, project.id, "linked")
        real = launch.run_folder(db, linked)
        (real / "runspec.json").unlink()
        real.rmdir()
        real.symlink_to(target, target_is_directory=True)
        assert history.delete_run(db, linked.id) == [str(real)]
        assert not real.is_symlink() and not real.exists() and db.get_run(linked.id) is None
    assert (other_folder / "weights.bin").exists() and (victim / "precious.txt").exists()


def test_a_training_run_cannot_be_deleted_and_a_run_without_folder_can(db, project):
    run = make_run(db, project.id, "busy", status="running")
    db.update_run(run.id, pid=os.getpid(), heartbeat_at=utcnow())  # alive: this very process
    with pytest.raises(history.HistoryError, match="stop it"):
        history.delete_run(db, run.id)
    assert launch.run_folder(db, run).exists()
    bare = db.create_run(project.id, "no folder", "lora", RunSpec(sample_task="dates").to_dict())
    assert history.delete_run(db, bare.id) == [] and db.get_run(bare.id) is None


def test_clone_returns_the_runspec_and_names_what_the_train_tab_cannot_set(db, project):
    run = make_run(db, project.id, "source", method="dora", method_settings={"r": 4}, weight_decay=0.1,
                   learning_rate=5e-4, max_steps=12)
    spec = history.clone_spec(db, run.id)
    assert spec.to_dict() == db.get_run(run.id).spec
    assert history.hidden_changes(spec, ["max_steps", "learning_rate"]) == {"weight_decay": 0.1}
    assert history.hidden_changes(RunSpec(), []) == {}
    with pytest.raises(history.HistoryError):
        history.clone_spec(db, 12345)
