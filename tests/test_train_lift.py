"""Slow: the first-run demo path really teaches the real model its task.

LoRA on the embedded SmolLM2-135M, one sample task, the studio's own worker and defaults sized
for a CPU: the eval exact match after training beats the base model's on the same prompts.
"""

from __future__ import annotations

import time

import pytest

from studio.db import Database
from studio.evaluate import score_task
from studio.models import load_model, load_tokenizer
from studio.projects import create_project
from studio.runspec import RunSpec
from studio.worker import launch

pytestmark = pytest.mark.slow

TASK, LIMIT = "dates", 20


def test_lora_raises_exact_match_over_the_base(smollm2_dir):
    tokenizer = load_tokenizer(str(smollm2_dir))
    base = score_task(load_model(str(smollm2_dir)).eval(), tokenizer, TASK, limit=LIMIT).exact_match

    db = Database()
    project = create_project(db, "lift")
    spec = RunSpec(model=str(smollm2_dir), method="lora", sample_task=TASK, max_steps=60, batch_size=4,
                   max_length=96, learning_rate=2e-4, eval_steps=0, save_steps=0, exact_match_limit=LIMIT)
    run = launch.create_run(db, project.id, spec)
    launch.start(db, run.id)
    deadline = time.monotonic() + 1500
    while db.get_run(run.id).status == "running" and time.monotonic() < deadline:
        time.sleep(2)
        launch.reconcile(db)
    finished = db.get_run(run.id)
    assert finished.status == "completed", finished.error
    trained = [m.value for m in db.metrics_for(run.id, names=["eval_exact_match"])][-1]
    print(f"{TASK}: base exact match {base:.0%}, after 60 LoRA steps {trained:.0%}")
    assert trained > base + 0.3
