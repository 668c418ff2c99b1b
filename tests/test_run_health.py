"""A run's health as the supervisor judges it (issue 15, items 1 and 4), with real worker
processes on the tiny chat model and a real history file.

- A long evaluation keeps its run alive: the worker beats during it and says what it does.
- A worker that is truly hung (paused with SIGSTOP: alive, silent) is killed before its run is
  marked failed; a run whose worker still lives cannot be started a second time.
- After "Stop and discard", what Resume says is what the worker does (step 0, no checkpoint).
"""

from __future__ import annotations

import json
import os
import signal
from datetime import timedelta

import psutil
import pytest

from studio import projects
from studio.data import import_dataset
from studio.db import Database, utcnow
from studio.runs import launch, liveness, outcome
from studio.ui import train_view
from studio.worker import train
from worker_helpers import (explain, metrics, new_run, reap_workers, tiny_spec,  # noqa: F401
                            wait_finished, wait_for)


def paused_worker(db: Database, model) -> tuple[int, int]:
    """A real worker for a long run, paused (SIGSTOP) at once: alive, and silent from now on."""
    run = new_run(db, tiny_spec(model, max_steps=400))
    started = launch.start(db, run.id)
    os.kill(started.pid, signal.SIGSTOP)
    return run.id, started.pid


def test_a_hung_worker_is_killed_before_its_run_is_marked_failed(tiny_chat_model):
    """Before: the run was marked failed and its worker left alive (it went on training and
    saving beside the failed row)."""
    db = Database()
    run_id, pid = paused_worker(db, tiny_chat_model)
    assert launch.reconcile(db) == []  # silent, but not for long: left alone
    db.update_run(run_id, heartbeat_at=utcnow() - launch.STALE_HEARTBEAT - timedelta(seconds=5))

    assert launch.reconcile(db) == [run_id]
    run = db.get_run(run_id)
    assert run.status == "failed" and "hung" in run.error and "killed" in run.error, explain(db, run)
    assert not psutil.pid_exists(pid) and liveness.worker_process(pid, run_id) is None
    assert run.exit_code == -signal.SIGKILL
    assert launch.reconcile(db) == []


def test_a_run_whose_worker_still_lives_is_not_started_again(tiny_chat_model, monkeypatch):
    """A row marked failed while its worker lives (what the old reconcile did after ten silent
    minutes): Resume must not start a second worker on the same run folder."""
    monkeypatch.setattr(liveness, "EXIT_WAIT_S", 0.5)  # how long a Resume waits for it to exit
    db = Database()
    run_id, pid = paused_worker(db, tiny_chat_model)
    db.update_run(run_id, status="failed", error="no heartbeat (old reconcile)")
    try:
        with pytest.raises(launch.RunConflict, match=f"pid {pid}.* still running"):
            launch.resume(db, run_id)
        run = db.get_run(run_id)
        assert run.status == "failed" and run.pid == pid
        workers = [p for p in psutil.process_iter() if liveness.worker_process(p.pid, run_id) is not None]
        assert [p.pid for p in workers] == [pid]  # of this home: other tests' runs have ids too
    finally:
        os.killpg(pid, signal.SIGKILL)
        launch._children[pid].wait(timeout=10)


def long_answers_dataset(db: Database, folder) -> int:
    """A chat dataset of 8 training and 8 eval rows whose answers are ~230 tokens long: the exact
    match generates one batch of that many tokens (a sample task's 50 eval rows cost far more)."""
    answer = " ".join(f"word{i}" for i in range(80))
    rows = [{"messages": [{"role": "user", "content": f"Say the words ({n})."},
                          {"role": "assistant", "content": answer}]} for n in range(16)]
    for name, part in (("train", rows[:8]), ("eval", rows[8:])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    project = db.get_project_by_name("worker tests") or projects.create_project(db, "worker tests")
    return import_dataset(db, project.id, str(folder / "train.jsonl"), eval_source=str(folder / "eval.jsonl"),
                          format="messages").dataset.id


def test_a_long_evaluation_beats_and_shows_its_progress(tiny_chat_model, tmp_path):
    """Before: the heartbeat was written only at step end, so an evaluation longer than the hang
    timeout got a healthy run marked failed, and the Train tab showed a frozen step bar. One
    evaluation (the final one; a mid-training one goes through the same ``evaluate``): eval loss
    on two batches, then eight answers of up to 246 tokens, with a beat at most every quarter
    second and one as soon as the number of answers is known."""
    db = Database()
    dataset_id = long_answers_dataset(db, tmp_path)
    run = new_run(db, tiny_spec(tiny_chat_model, sample_task=None, dataset_id=dataset_id, max_steps=1,
                                exact_match_limit=8))
    launch.start(db, run.id)
    seen: list[tuple] = []  # (heartbeat, activity) while evaluating, as the UI's poll reads them

    def ended():
        row = db.get_run(run.id)
        if row.activity and row.activity.get("phase") == "evaluating":
            seen.append((row.heartbeat_at, row.activity))
            if len(seen) == 1 or seen[-1][1] != seen[-2][1]:
                view = train_view.render_run(db, run.id)
                assert "evaluating at step 1" in view.status and "train-eval-progress" in view.progress
        return row.status != "running"
    wait_for(ended, 180, interval=0.05, what="the run to end")
    row = wait_finished(db, run.id)
    assert row.status == "completed", explain(db, row)

    answers = [a for _, a in seen if a["part"] == "exact match" and a["total"]]
    assert answers and {(a["total"], a["step"]) for a in answers} == {(8, 1)}, seen
    assert 0 in {a["done"] for a in answers} <= {0, 8}  # k of n (one batch of 8: 0, then 8)
    assert len({beat for beat, a in seen if a["part"] == "exact match"}) >= 2, seen  # beats while generating
    assert 1 in metrics(db, run.id)["eval_seconds"]  # timed, for the ETA of the next ones


def test_resume_after_stop_and_discard_says_it_restarts_and_does(tiny_chat_model):
    """Before: "Resumed run #7 from its latest checkpoint", and the worker began at step 0. The
    stop itself is as the worker records it (test_worker_methods.py): cancelled, the request
    kept, no checkpoint."""
    db = Database()
    run = new_run(db, tiny_spec(tiny_chat_model, max_steps=1))
    db.update_run(run.id, status="cancelled", cancel_request="discard", started_at=utcnow(),
                  finished_at=utcnow())
    stopped = db.get_run(run.id)
    assert outcome.status_words(db, stopped) == "cancelled: stopped and discarded, no checkpoint kept"
    assert "cancelled: stopped and discarded" in train_view.render_run(db, run.id).summary

    point, kind = outcome.resume_point(db, run.id), outcome.stop_kind(stopped)
    message = train_view.resumed_message(run.id, point, kind)
    assert point is None and "from step 0" in message and "discard" in message
    db.update_run(run.id, cancel_request=None)  # what launch.resume -> launch.start does
    assert train.train(db, run.id, resume=True) == "completed", explain(db, db.get_run(run.id))
    assert sorted(metrics(db, run.id)["loss"]) == [1]  # the message told the truth
