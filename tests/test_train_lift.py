"""Slow: the first-run demo path really teaches the real model its task.

LoRA on the embedded SmolLM2-135M, one sample task, the studio's own worker and defaults sized
for a CPU: the eval exact match after training beats the base model's on the same prompts. The
run is conftest's ``smollm2_lora_run`` (trained once per session).
"""

from __future__ import annotations

import gc

import pytest

from conftest import LIFT_LIMIT, LIFT_TASK
from studio.db import Database
from studio.evaluate import score_task
from studio.models import load_model, load_tokenizer

pytestmark = pytest.mark.slow


def test_lora_raises_exact_match_over_the_base(smollm2_dir, smollm2_lora_run, monkeypatch):
    tokenizer = load_tokenizer(str(smollm2_dir))
    model = load_model(str(smollm2_dir)).eval()
    base = score_task(model, tokenizer, LIFT_TASK, limit=LIFT_LIMIT).exact_match
    del model
    gc.collect()  # 538 MB of weights: not for the rest of the session

    home, run_id = smollm2_lora_run
    monkeypatch.setenv("PEFT_STUDIO_HOME", str(home))
    db = Database()
    finished = db.get_run(run_id)
    assert finished.status == "completed", finished.error
    trained = [m.value for m in db.metrics_for(run_id, names=["eval_exact_match"])][-1]
    steps = finished.spec["max_steps"]
    print(f"{LIFT_TASK}: base exact match {base:.0%}, after {steps} LoRA steps {trained:.0%}")
    assert trained > base + 0.3
