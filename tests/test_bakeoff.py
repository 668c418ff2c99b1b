"""A bake-off for real: three methods on the tiny chat model, through real worker processes.

The test only starts the bake-off and then reads the history; the queue is advanced by the
workers themselves. Every measured column must be filled from the runs' own recorded metrics,
and the values must be the ones measured (checked against the files and the built models).
"""

from __future__ import annotations

import csv
import io

from queue_helpers import explain, wait_for
from studio.bakeoff import (MEASURED, Budget, build_rows, is_finished, refresh, start_bakeoff,
                            to_csv, to_markdown)
from studio.bakeoff.measure import weights_bytes
from studio.runs import launch

METHODS = ["lora", "houlsby", "prompt"]  # merged PEFT, our own adapter, a prompt-learning method


def test_three_method_bakeoff_fills_every_column_from_measurements(db, tiny_chat_model):
    from studio import projects

    project = projects.create_project(db, "bake-off", model_source=str(tiny_chat_model))
    budget = Budget(max_steps=3, batch_size=2, max_length=64, eval_rows=4)
    row = start_bakeoff(db, project.id, METHODS, budget, sample_task="dates")
    assert row.methods == METHODS and len(row.run_ids) == 3 and row.budget["max_steps"] == 3
    specs = [db.get_run(r).spec for r in row.run_ids]
    assert {(s["max_steps"], s["batch_size"], s["max_length"], s["exact_match_limit"]) for s in specs} \
        == {(3, 2, 64, 4)}  # one shared budget

    wait_for(lambda: is_finished(db, db.get_bakeoff(row.id)), 400, interval=1.0, what="the bake-off")
    for run_id in row.run_ids:
        assert db.get_run(run_id).status == "completed", explain(db, run_id)

    rows = refresh(db, row.id)
    assert [r["method_name"] for r in rows] == METHODS
    assert db.get_bakeoff(row.id).table == rows  # saved with the project
    for r in rows:
        missing = [k for k in MEASURED if r[k] is None]
        assert not missing, (r["method"], missing, db.get_bakeoff(row.id).notes)
        assert r["trainable_params"] > 0 and r["adapter_mb"] > 0 and r["peak_memory_mb"] > 50
        assert r["peak_memory_kind"] == "RSS (CPU)"
        assert r["train_s"] > 0 and r["train_tokens_per_s"] > 0 and r["infer_tokens_per_s"] > 0
        assert 0.0 <= r["exact_match"] <= 1.0 and r["eval_loss"] > 0
    by = {r["method_name"]: r for r in rows}
    assert by["lora"]["inference"] == "merged" and by["lora"]["mergeable"] == "yes"
    assert by["houlsby"]["inference"] == by["prompt"]["inference"] == "adapter"
    assert by["houlsby"]["mergeable"] == by["prompt"]["mergeable"] == "no"

    # The figures are the measured ones: the adapter size is the saved weights' size, the
    # trainable count is what the planner predicts for this model (checked against PEFT elsewhere).
    from studio.arch import ArchInfo
    from studio.methods import get_method
    from studio.models import load_config

    arch = ArchInfo.from_config(load_config(str(tiny_chat_model)))
    for method, run_id in zip(METHODS, row.run_ids):
        adapter = launch.run_folder(db, db.get_run(run_id)) / "adapter"
        assert by[method]["adapter_mb"] == round(weights_bytes(adapter) / 2**20, 3)
        spec = get_method(method)
        assert by[method]["trainable_params"] == spec.count(arch, spec.default_params()).trainable

    # Exports carry the same rows.
    parsed = list(csv.DictReader(io.StringIO(to_csv(rows))))
    assert [p["method"] for p in parsed] == [r["method"] for r in rows]
    assert all(p["train tokens/s"] and p["eval exact match"] for p in parsed)
    markdown = to_markdown(rows)
    assert markdown.count("\n") == 2 + len(rows) and "—" not in markdown


def test_a_bakeoff_waits_behind_a_running_training_and_can_be_cancelled(db, tiny_chat_model):
    """A bake-off queued while another run trains does not start; cancelling it cancels its
    waiting runs, and the plain run is untouched."""
    from studio import projects
    from studio.bakeoff import cancel_bakeoff
    from studio.runspec import RunSpec

    project = projects.create_project(db, "busy", model_source=str(tiny_chat_model))
    long_run = launch.create_run(db, project.id, RunSpec(
        model=str(tiny_chat_model), sample_task="dates", max_steps=400, batch_size=2, max_length=64,
        eval_steps=0, save_steps=0, exact_match_limit=0))
    launch.start(db, long_run.id)
    row = start_bakeoff(db, project.id, ["lora", "ia3"], Budget(max_steps=2), sample_task="dates")
    assert [db.get_run(r).status for r in row.run_ids] == ["queued", "queued"]
    assert cancel_bakeoff(db, row.id) == 2
    assert [db.get_run(r).status for r in row.run_ids] == ["cancelled", "cancelled"]
    assert db.get_run(long_run.id).status == "running"
    assert {r["status"] for r in build_rows(db, db.get_bakeoff(row.id))} == {"cancelled"}
