"""What the Train tab draws while a run evaluates, and for the two kinds of stop (issue 15): from
rows in a real history file, written as a worker writes them (no worker, no browser: fast)."""

from __future__ import annotations

import os

import pytest

from studio import projects
from studio.db import Database, utcnow
from studio.runs import launch
from studio.runspec import RunSpec
from studio.ui import train_view

NOW = 1_000_000.0


@pytest.fixture
def running():
    """A running run of 60 steps (eval every 20) that has trained 20 steps at 3 s each."""
    db = Database()
    project = projects.create_project(db, "view")
    run = launch.create_run(db, project.id, RunSpec(model="default", sample_task="dates", max_steps=60,
                                                    eval_steps=20))
    db.update_run(run.id, status="running", pid=os.getpid(), heartbeat_at=utcnow(), started_at=utcnow())
    for step in range(1, 21):
        db.log_metrics(run.id, step, {"loss": 2.0, "elapsed_s": 3.0 * step})
    yield db, run.id
    db.update_run(run.id, status="failed")  # nothing for the fixtures' clean-up to stop
    db.close()


def evaluating(done, total, part="exact match", since=NOW - 30):
    return {"phase": "evaluating", "part": part, "done": done, "total": total, "step": 20, "since": since}


def test_an_evaluation_shows_its_own_progress(running):
    """Before: the status said only "running" and the bar stood still at step 20 for minutes."""
    db, run_id = running
    db.heartbeat(run_id, evaluating(12, 50))
    view = train_view.render_run(db, run_id, now=NOW)
    assert "evaluating at step 20: exact match, answer 12 of 50" in view.status
    assert "train-eval-progress" in view.progress and "width:24.0%" in view.progress  # 12 / 50
    assert "Step 20 / 60" in view.progress

    db.heartbeat(run_id, evaluating(3, 13, part="eval loss"))
    assert "eval loss, batch 3 of 13" in train_view.render_run(db, run_id, now=NOW).status
    db.heartbeat(run_id, None)  # back to training steps: no evaluation shown
    view = train_view.render_run(db, run_id, now=NOW)
    assert "evaluating" not in view.status and "train-eval-progress" not in view.progress


def test_the_eta_counts_the_evaluations_still_to_come(running):
    """Before: 40 steps × 3 s = "ETA 2 min 0 s", though two evaluations (40, and 60 which is the
    final one) of 5 minutes each were still to come."""
    db, run_id = running
    untimed = train_view.render_run(db, run_id, now=NOW).progress
    assert "ETA 2 min 0 s + 2 evaluation(s), not timed yet" in untimed

    db.log_metrics(run_id, 20, {"eval_seconds": 300.0})  # the step-20 evaluation took 5 minutes
    assert "ETA 12 min 0 s" in train_view.render_run(db, run_id, now=NOW).progress  # 120 + 2 × 300 s

    # At step 40's evaluation, 30 s in: what is left of it (300 - 30 s) comes on top of the 20
    # steps and the evaluation at step 60 (the final one) still to come.
    for step in range(21, 41):
        db.log_metrics(run_id, step, {"loss": 2.0, "elapsed_s": 3.0 * step})
    db.heartbeat(run_id, {**evaluating(12, 50, since=NOW - 30), "step": 40})
    assert "ETA 10 min 30 s" in train_view.render_run(db, run_id, now=NOW).progress  # 60 + 300 + 270


def test_evaluations_left_by_schedule():
    spec = RunSpec(sample_task="dates", max_steps=60, eval_steps=20)
    # Step 60 is an eval step: that evaluation is the final one (the worker does not run another).
    assert [train_view.evaluations_left(spec, s, 60, True) for s in (0, 19, 20, 59, 60)] == [3, 3, 2, 1, 0]
    assert [train_view.evaluations_left(spec, s, 50, True) for s in (0, 40, 50)] == [3, 1, 1]
    assert train_view.evaluations_left(spec, 10, 60, False) == 0
    assert train_view.evaluations_left(RunSpec(sample_task="dates", eval_steps=0), 10, 60, True) == 1


def test_the_two_stop_modes_read_differently(running):
    """Before: both showed "cancelled"."""
    db, run_id = running
    folder = launch.run_folder(db, db.get_run(run_id)) / "checkpoints" / "checkpoint-20"
    folder.mkdir(parents=True)
    db.add_checkpoint(run_id, 20, folder)
    db.update_run(run_id, status="cancelled", cancel_request="save", finished_at=utcnow())
    saved = train_view.render_run(db, run_id, now=NOW)
    assert "cancelled: stopped and saved, checkpoint at step 20 kept" in saved.status
    assert "Run #%d cancelled: stopped and saved" % run_id in saved.summary

    db.delete_checkpoints(run_id)
    db.update_run(run_id, cancel_request="discard")
    discarded = train_view.render_run(db, run_id, now=NOW)
    assert "cancelled: stopped and discarded, no checkpoint kept" in discarded.status
    assert "### Run #%d cancelled: stopped and discarded" % run_id in discarded.summary
