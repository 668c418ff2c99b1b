"""The bake-off table from recorded metrics: values and units, CSV and Markdown export, the
scatter points, saving with the project, and the budget / spec rules. No worker: fast."""

from __future__ import annotations

import csv
import io
import math

import pytest

from studio import projects
from studio.bakeoff import (COLUMNS, Budget, build_rows, method_spec, refresh,
                            scatter_points, to_csv, to_markdown)
from studio.bakeoff.table import quality_label
from studio.db import Database
from studio.runspec import RunSpec
from studio.methods import get_method

LORA = {"trainable_params": 4_884_480, "adapter_bytes": 19_560_000, "peak_rss_bytes": 1_234_567_890,
        "train_seconds": 123.45, "train_tokens_per_s": 151.234, "eval_loss": 0.31234,
        "eval_exact_match": 0.9, "inference_tokens_per_s": 21.06, "inference_merged": 1.0}


@pytest.fixture
def setup():
    db = Database()
    project = projects.create_project(db, "table")
    spec = RunSpec(sample_task="dates").to_dict()
    lora = db.create_run(project.id, "lora", "lora", spec)
    prompt = db.create_run(project.id, "prompt", "prompt", spec)
    db.update_run(lora.id, status="completed")
    db.update_run(prompt.id, status="completed")
    db.log_metrics(lora.id, 40, LORA)
    db.log_metrics(lora.id, 20, {"eval_loss": 9.0})  # an earlier step never wins
    db.log_metrics(prompt.id, 40, {"trainable_params": 11_520, "adapter_bytes": 46_200,
                                   "peak_cuda_allocated_bytes": 2e9, "train_seconds": 80.0,
                                   "train_tokens_per_s": 200.0, "eval_loss": float("nan"),
                                   "inference_tokens_per_s": 15.0, "inference_merged": 0.0})
    row = db.create_bakeoff(project.id, "b", "default", ["lora", "prompt"], Budget().to_dict(),
                            [lora.id, prompt.id], sample_task="dates")
    yield db, row, lora.id, prompt.id
    db.close()


def test_rows_hold_the_last_measured_values_in_display_units(setup):
    db, row, lora_id, _ = setup
    lora, prompt = build_rows(db, row)
    assert lora == {**lora, "method": "LoRA", "run_id": lora_id, "status": "completed",
                    "trainable_params": 4_884_480, "adapter_mb": 18.654, "peak_memory_mb": 1177,
                    "peak_memory_kind": "RSS (CPU)", "train_s": 123.5, "train_tokens_per_s": 151.2,
                    "eval_loss": 0.3123, "exact_match": 0.9, "infer_tokens_per_s": 21.1,
                    "inference": "merged", "mergeable": "yes"}
    # Not measured stays None (NaN loss, no exact match), never 0; GPU memory is labelled so.
    assert prompt["eval_loss"] is None and prompt["exact_match"] is None
    assert prompt["peak_memory_kind"] == "GPU allocated" and prompt["peak_memory_mb"] == 1907
    assert prompt["inference"] == "adapter" and prompt["mergeable"] == "no"


def test_csv_and_markdown_exports(setup):
    db, row, lora_id, prompt_id = setup
    db.add_bakeoff_note(row.id, prompt_id, "measurement after training failed: boom")
    rows = build_rows(db, db.get_bakeoff(row.id))
    parsed = list(csv.reader(io.StringIO(to_csv(rows))))
    assert parsed[0] == [h for _, h in COLUMNS] + ["run id", "note"]
    lora = dict(zip(parsed[0], parsed[1]))
    assert lora["trainable parameters"] == "4884480" and lora["eval exact match"] == "0.9"
    assert lora["run id"] == str(lora_id) and lora["note"] == ""
    prompt = dict(zip(parsed[0], parsed[2]))
    assert prompt["final eval loss"] == "" and prompt["note"].endswith("boom")

    md = to_markdown(rows).splitlines()
    assert md[0].startswith("| method | status | trainable parameters |") and md[1].startswith("|---|")
    assert md[2].startswith("| LoRA | completed | 4,884,480 | 18.65 | 1,177 | RSS (CPU) | 123.5 |")
    assert md[3].count("—") == 2  # loss and exact match not measured
    assert md[-1] == "- Prompt tuning: measurement after training failed: boom"
    assert all(line.count("|") == len(COLUMNS) + 1 for line in md[:4])


def test_scatter_points_and_saving_with_the_project(setup):
    db, row, lora_id, prompt_id = setup
    rows = refresh(db, row.id)
    assert db.get_bakeoff(row.id).table == rows
    points = scatter_points(rows)
    assert quality_label(rows) == "eval exact match"
    assert points == [{"method": "LoRA", "log10 trainable parameters": pytest.approx(math.log10(4_884_480)),
                       "trainable parameters": 4_884_480, "eval exact match": 0.9}]

    db.delete_run(lora_id)  # the saved figures outlive the run
    again = refresh(db, row.id)
    assert again[0]["trainable_params"] == 4_884_480 and again[0]["status"] == "completed"
    assert db.get_bakeoff(row.id).table == again


def test_scatter_falls_back_to_eval_loss_without_exact_match(setup):
    db, row, _, _ = setup
    rows = [dict(r, exact_match=None) for r in build_rows(db, row)]
    assert quality_label(rows) == "minus eval loss"
    assert [p["minus eval loss"] for p in scatter_points(rows)] == [-0.3123]


def test_method_specs_share_the_budget_and_use_each_methods_rate():
    budget = Budget(max_steps=7, batch_size=3, max_length=96, eval_rows=5, seed=1)
    specs = {m: method_spec("default", m, budget, sample_task="dates") for m in ("lora", "prompt", "ia3")}
    for name, spec in specs.items():
        assert (spec.max_steps, spec.batch_size, spec.max_length, spec.exact_match_limit, spec.seed) == (7, 3, 96, 5, 1)
        assert spec.learning_rate == get_method(name).default_learning_rate and spec.eval_steps == 0 and spec.save_steps == 0
    assert method_spec("default", "prompt", Budget(learning_rate=1e-3), sample_task="dates").learning_rate == 1e-3
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        method_spec("default", "nope", budget, sample_task="dates")


def test_start_refuses_bad_input_and_creates_nothing():
    from studio.bakeoff import start_bakeoff

    db = Database()
    project = projects.create_project(db, "refusals")
    for methods, kwargs, message in [([], {"sample_task": "dates"}, "at least one method"),
                                     (["lora"], {}, "sample task or a dataset"),
                                     (["lora", "nope"], {"sample_task": "dates"}, "unknown method")]:
        with pytest.raises(ValueError, match=message):
            start_bakeoff(db, project.id, methods, Budget(), **kwargs)
    assert db.list_runs(project.id) == [] and db.list_bakeoffs(project.id) == []


def test_cli_queues_without_waiting_and_refuses_bad_methods(capsys):
    """``peft-studio bakeoff --no-wait`` while another run holds the device: queued, not started."""
    import os

    from studio import cli

    db = Database()
    project = projects.create_project(db, "cli bake-off")
    holder = db.create_run(project.id, "holder", "lora", RunSpec(sample_task="dates").to_dict())
    db.enqueue_runs([holder.id])
    db.claim_run(None, os.getpid())
    try:
        code = cli.main(["bakeoff", "--task", "dates", "--methods", "lora,ia3", "--steps", "3",
                         "--project", "cli bake-off", "--no-wait"])
        assert code == 0 and "queued in project 'cli bake-off'" in capsys.readouterr().out
        (row,) = db.list_bakeoffs(project.id)
        assert row.methods == ["lora", "ia3"] and row.budget["max_steps"] == 3
        assert [r.id for r in db.waiting_runs()] == row.run_ids
        assert cli.main(["bakeoff", "--task", "dates", "--methods", "lora,nope", "--project", "cli bake-off"]) == 2
        assert "unknown method 'nope'" in capsys.readouterr().err
    finally:
        for run_id in [holder.id, *db.list_bakeoffs(project.id)[0].run_ids]:
            db.update_run(run_id, status="cancelled")
