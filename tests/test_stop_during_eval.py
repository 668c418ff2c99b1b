"""A stop during an evaluation interrupts it (``studio/worker/eval_stop.py``), on the tiny chat
model with a real history file:

- "Stop and save" from the UI while a real worker generates its exact-match answers: the run
  ends within a fraction of what the rest of the evaluation would have taken (measured on its
  own first batch of answers), with the checkpoint of the step the evaluation followed and no
  exact match recorded;
- "Stop and discard" during the eval-loss pass of a mid-training evaluation: no eval loss, no
  further step, no checkpoint;
- SIGTERM (a real signal, to this process) during the final evaluation after training: the run
  is cancelled with the last step's checkpoint, and Resume finishes the evaluation from it.

Before the fix each of these waited for the whole evaluation, and the last one completed the run.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

from transformers import TrainerCallback

from studio import projects
from studio.data import import_dataset
from studio.db import Database
from studio.runs import launch, outcome
from studio.worker import train
from studio.worker.signals import GracefulStop
from worker_helpers import (explain, folder_of, metrics, new_run, reap_workers, tiny_spec,  # noqa: F401
                            wait_finished, wait_for)

ANSWERS_PER_BATCH = 8  # evaluate.score_examples' batch of generated answers


def long_answers_dataset(db: Database, folder: Path, eval_rows: int) -> int:
    """8 training rows and ``eval_rows`` eval rows whose answers are ~230 tokens long: the random
    tiny model never ends an answer early, so each batch of answers costs ~246 decoding steps."""
    answer = " ".join(f"word{i}" for i in range(80))
    rows = [{"messages": [{"role": "user", "content": f"Say the words ({n})."},
                          {"role": "assistant", "content": answer}]} for n in range(8 + eval_rows)]
    for name, part in (("train", rows[:8]), ("eval", rows[8:])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    project = db.get_project_by_name("worker tests") or projects.create_project(db, "worker tests")
    return import_dataset(db, project.id, str(folder / "train.jsonl"), eval_source=str(folder / "eval.jsonl"),
                          format="messages").dataset.id


def exact_match_activity(db: Database, run_id: int) -> dict | None:
    activity = db.get_run(run_id).activity or {}
    return activity if activity.get("part") == "exact match" and activity.get("total") else None


def test_stop_and_save_during_the_exact_match_ends_the_run_within_an_answer(tiny_chat_model, tmp_path):
    """A real worker evaluates after step 1: 128 answers in 16 batches. Once the history shows
    the first batch done, "Stop and save": the run must end well before the 15 batches left
    could have been generated, at their measured pace."""
    db = Database()
    rows = 128
    dataset_id = long_answers_dataset(db, tmp_path, rows)
    run = new_run(db, tiny_spec(tiny_chat_model, sample_task=None, dataset_id=dataset_id, max_steps=50,
                                eval_steps=1, exact_match_limit=rows))
    launch.start(db, run.id)
    wait_for(lambda: exact_match_activity(db, run.id), 120, interval=0.02, what="the exact match to begin")
    began = time.monotonic()  # the history says "exact match 0 of 128" (a forced beat)
    first = wait_for(lambda: (a := exact_match_activity(db, run.id)) and a["done"] > 0 and a, 120,
                     interval=0.02, what="the first batch of answers")
    pace = time.monotonic() - began  # one batch of answers, as the history shows it
    assert first["step"] == 1 and first["total"] == rows, first

    launch.stop(db, run.id, "save")
    asked = time.monotonic()
    row = wait_finished(db, run.id, timeout=120)
    took = time.monotonic() - asked
    left = (rows - first["done"]) / ANSWERS_PER_BATCH * pace  # what the evaluation still had to do
    assert took < left / 3, (took, left, pace)

    assert row.status == "cancelled" and row.error is None, explain(db, row)
    assert outcome.status_words(db, row) == "cancelled: stopped and saved, checkpoint at step 1 kept"
    recorded = metrics(db, run.id)
    assert sorted(recorded["loss"]) == [1]  # no step after the evaluation it interrupted
    assert "eval_exact_match" not in recorded and "eval_seconds" not in recorded, recorded
    assert 1 in recorded["eval_loss"]  # that pass had finished: a whole score
    [ckpt] = db.list_checkpoints(run.id)
    assert ckpt.step == 1 and json.loads((Path(ckpt.path) / "trainer_state.json").read_text())["global_step"] == 1
    assert not (folder_of(db, run.id) / "adapter").exists()


class DiscardAfterStepEnd(TrainerCallback):
    """Asks for "Stop and discard" through the history at the end of ``step``, after the
    studio's own step-end check (callbacks run in order): the request finds the evaluation."""

    def __init__(self, db: Database, run_id: int, step: int):
        self.db, self.run_id, self.step = db, run_id, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            assert control.should_evaluate  # an evaluation follows this step
            launch.stop(self.db, self.run_id, "discard")


def test_stop_and_discard_during_the_eval_loss_pass_stops_at_its_first_batch(tiny_chat_model, tmp_path):
    db = Database()
    dataset_id = long_answers_dataset(db, tmp_path, 16)
    run = new_run(db, tiny_spec(tiny_chat_model, sample_task=None, dataset_id=dataset_id, max_steps=50,
                                eval_steps=2, save_steps=1, exact_match_limit=16))
    assert train.train(db, run.id, extra_callbacks=(DiscardAfterStepEnd(db, run.id, 2),)) == "cancelled"
    row = db.get_run(run.id)
    assert row.status == "cancelled" and row.error is None, explain(db, row)
    assert outcome.status_words(db, row) == "cancelled: stopped and discarded, no checkpoint kept"
    recorded = metrics(db, run.id)
    assert sorted(recorded["loss"]) == [1, 2]
    assert not {"eval_loss", "eval_exact_match", "eval_seconds"} & set(recorded), recorded
    assert db.list_checkpoints(run.id) == [] and not (folder_of(db, run.id) / "checkpoints").exists()


def test_sigterm_during_the_final_evaluation_keeps_the_last_step_and_resume_finishes(tiny_chat_model, tmp_path):
    """eval_steps 0: the worker evaluates once, after training, and saves no checkpoint of its
    own. SIGTERM while it generates: cancelled, with the last step's checkpoint, which Resume
    takes up to evaluate and save the adapter without training again."""
    db = Database()
    dataset_id = long_answers_dataset(db, tmp_path, 16)
    run = new_run(db, tiny_spec(tiny_chat_model, sample_task=None, dataset_id=dataset_id, max_steps=2,
                                exact_match_limit=16))
    done = threading.Event()

    def signal_when_generating():  # as a shutdown would: a signal, whatever the worker is doing
        while not done.is_set():
            if (activity := exact_match_activity(db, run.id)) and activity["done"] == 0:  # 2 batches left
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.02)

    stop = GracefulStop()
    stop.install()
    sender = threading.Thread(target=signal_when_generating, daemon=True)
    sender.start()
    try:
        status = train.train(db, run.id, stop=stop)
    finally:
        done.set()
        sender.join(timeout=10)
        stop.uninstall()
    row = db.get_run(run.id)
    assert status == "cancelled" and stop.signal_name == "SIGTERM", explain(db, row)
    assert row.error.startswith("Stopped by SIGTERM at step 2, like Stop and save"), row.error
    assert "eval_exact_match" not in metrics(db, run.id)
    [ckpt] = db.list_checkpoints(run.id)
    assert ckpt.step == 2 and Path(ckpt.path).is_dir()
    assert not (folder_of(db, run.id) / "adapter").exists()

    db.update_run(run.id, cancel_request=None)  # what launch.resume -> launch.start does
    assert train.train(db, run.id, resume=True) == "completed", explain(db, db.get_run(run.id))
    recorded = metrics(db, run.id)
    assert sorted(recorded["loss"]) == [1, 2] and 2 in recorded["eval_exact_match"], recorded
    assert (folder_of(db, run.id) / "adapter").is_dir()
