"""The training worker as a process: started, stopped and finished for real.

Nothing is mocked: each test starts ``python -m studio.worker`` on the random 2-layer Llama with
the real SmolLM2 tokenizer (the ``dates`` sample task) and watches it through the SQLite history,
as the UI does. A worker process costs ~7 s of imports, so only what needs the process is here:
the whole path end to end, and a Stop reaching a running or still-starting worker. What each
method and Trainer feature does is in test_worker_methods.py (trained in this process); kills,
crashes and reconcile are in test_worker_reliability.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from studio.db import Database
from studio.runs import launch
from worker_helpers import (FAST, explain, folder_of, metrics, new_run, reap_workers,  # noqa: F401
                            run_through_worker, tiny_spec, wait_finished, wait_for)

# ----------------------------------------------------------------------------- end to end


def test_a_run_trains_end_to_end_through_the_worker(tiny_chat_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    db = Database()
    steps = 6
    run = run_through_worker(db, tiny_spec(tiny_chat_model, max_steps=steps, eval_steps=3, save_steps=3,
                                           exact_match_limit=2, lr_scheduler="linear"))
    assert run.status == "completed", explain(db, run)
    assert run.exit_code == 0 and run.error is None and run.finished_at is not None

    m = metrics(db, run.id)
    for name in ("loss", "learning_rate", "tokens_per_s", "grad_norm", "elapsed_s", "memory_bytes"):
        assert sorted(m[name]) == list(range(1, steps + 1)), (name, m[name])
    assert all(math.isfinite(v) and v > 0 for v in m["loss"].values())
    assert all(v > 0 for v in m["tokens_per_s"].values())
    assert all(math.isfinite(v) and v > 0 for v in m["grad_norm"].values())
    lrs = [m["learning_rate"][s] for s in range(1, steps + 1)]
    assert lrs[0] == pytest.approx(1e-2) and lrs == sorted(lrs, reverse=True) and lrs[-1] < lrs[0]
    assert m["epoch"][1] == pytest.approx(FAST["batch_size"] / 400)  # 400 training examples
    assert sorted(m["eval_loss"]) == [3, 6]
    assert sorted(m["eval_exact_match"]) == [3, 6]
    # One evaluation per eval step: the Trainer's at step 6 is the final one (the worker used to
    # evaluate the same weights again, doubling the wait at the end of every run).
    log = (folder_of(db, run.id) / launch.LOG_NAME).read_text()
    assert log.count("'eval_loss'") == 2, log
    assert all(0.0 <= v <= 1.0 for v in m["eval_exact_match"].values())

    folder = folder_of(db, run.id)
    checkpoints = db.list_checkpoints(run.id)
    assert [c.step for c in checkpoints] == [3, 6]
    for ckpt in checkpoints:
        path = Path(ckpt.path)
        assert path.parent == folder / "checkpoints" and path.name == f"checkpoint-{ckpt.step}"
        assert (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()
        state = json.loads((path / "trainer_state.json").read_text())
        assert state["global_step"] == ckpt.step
    assert json.loads((folder / "runspec.json").read_text())["max_steps"] == steps
    assert "run %d: completed" % run.id in launch.log_tail(db, run)

    # The final adapter reloads with plain PEFT and changes the model's output.
    adapter = folder / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_chat_model))
    ids = tokenizer("Convert 2021-03-04 to a long date.", return_tensors="pt").input_ids
    with torch.no_grad():
        base_logits = AutoModelForCausalLM.from_pretrained(str(tiny_chat_model))(ids).logits
        base = AutoModelForCausalLM.from_pretrained(str(tiny_chat_model))
        tuned = PeftModel.from_pretrained(base, str(adapter))
        tuned_logits = tuned(ids).logits
        with tuned.disable_adapter():
            disabled_logits = tuned(ids).logits
    assert torch.allclose(disabled_logits, base_logits, atol=1e-5)
    assert (tuned_logits - base_logits).abs().max().item() > 1e-2


# ------------------------------------------------------------------------------- cancel


def test_cancel_with_save_stops_within_a_step_and_keeps_a_checkpoint(tiny_chat_model):
    db = Database()
    run = new_run(db, tiny_spec(tiny_chat_model, max_steps=200, save_steps=1000, batch_size=16,
                                max_length=128, learning_rate=1e-3))
    launch.start(db, run.id)

    def logged_steps():
        step = db.last_step(run.id) or 0
        return step if step >= 3 else None
    seen = wait_for(logged_steps, 120, what="three logged steps")
    launch.stop(db, run.id, "save")
    run = wait_finished(db, run.id, timeout=60)
    assert run.status == "cancelled", explain(db, run)
    assert run.error is None
    last = max(metrics(db, run.id)["loss"])
    # The step in progress when the request came ends, then the worker stops.
    assert seen < last <= seen + 2, (seen, last)
    [ckpt] = db.list_checkpoints(run.id)
    assert ckpt.step == last
    assert (Path(ckpt.path) / "adapter_model.safetensors").is_file()
    assert json.loads((Path(ckpt.path) / "trainer_state.json").read_text())["global_step"] == last
    assert not (folder_of(db, run.id) / "adapter").exists()  # cancelled: no final adapter


def test_a_stop_pressed_while_the_worker_is_still_starting_is_not_lost(tiny_chat_model):
    """The worker needs seconds to import and load before its first step; a Stop clicked in
    that window must still stop it (after its first step), not be forgotten."""
    db = Database()
    run = new_run(db, tiny_spec(tiny_chat_model, max_steps=200, learning_rate=1e-3))
    launch.start(db, run.id)
    assert db.last_step(run.id) is None  # still importing
    launch.stop(db, run.id, "save")
    run = wait_finished(db, run.id, timeout=90)
    assert run.status == "cancelled", explain(db, run)
    assert max(metrics(db, run.id)["loss"]) <= 2
    assert db.latest_checkpoint(run.id).step == max(metrics(db, run.id)["loss"])
