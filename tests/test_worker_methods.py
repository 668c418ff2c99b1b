"""What the worker's training does, per method and per feature, trained in this process.

Nothing is mocked: the worker's own ``train.train`` (the function its process runs) trains the
random 2-layer Llama with the real SmolLM2 tokenizer on the ``dates`` sample task and reports to
the real SQLite history. No worker process is started here: each would cost ~7 s of imports
and show nothing about a method; the process machinery is tested in test_worker.py and
test_worker_reliability.py. Callbacks hook into the Trainer where a test needs to see inside
(gradient probes, the optimizer's parameter groups, a simulated OOM, a cancel at a given step).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from studio.db import Database
from studio.runs import launch
from studio.worker import train
from worker_helpers import explain, folder_of, metrics, new_run, tiny_spec, train_here

# ------------------------------------------------------------------------------- methods

METHOD_FILES = {
    "houlsby": ("bottleneck_config.json", "adapter_model.safetensors"),
    "full": ("config.json", "model.safetensors"),
}


@pytest.mark.parametrize("method,settings", [
    ("dora", {}),
    ("ia3", {}),
    ("prompt", {}),
    ("prefix", {}),
    ("houlsby", {"r": 8}),
    ("full", {}),
])
def test_methods_train_evaluate_and_save(tiny_chat_model, method, settings):
    """LoRA: test_worker.py's end-to-end run; LoRA+ (which only changes the optimizer):
    test_loraplus_gives_b_a_higher_learning_rate; QLoRA: the two tests after this one."""
    db = Database()
    steps = 3
    lr = 1e-4 if method == "full" else 1e-2
    # Exact match on two rows runs generation through every method (prompt / prefix included).
    run = train_here(db, tiny_spec(tiny_chat_model, method=method, method_settings=settings,
                                   max_steps=steps, save_steps=steps, exact_match_limit=2, learning_rate=lr))
    assert run.status == "completed", explain(db, run)
    m = metrics(db, run.id)
    assert sorted(m["loss"]) == list(range(1, steps + 1))
    assert all(math.isfinite(v) for v in m["loss"].values())
    assert all(math.isfinite(v) and v > 0 for v in m["grad_norm"].values()), m["grad_norm"]
    assert set(m["eval_loss"]) == {steps} and math.isfinite(m["eval_loss"][steps])
    assert set(m["eval_exact_match"]) == {steps}

    files = METHOD_FILES.get(method, ("adapter_config.json", "adapter_model.safetensors"))
    [ckpt] = db.list_checkpoints(run.id)
    assert ckpt.step == steps
    for name in files:
        assert (Path(ckpt.path) / name).is_file(), (name, sorted(os.listdir(ckpt.path)))
        assert (folder_of(db, run.id) / "adapter" / name).is_file()
    if method != "full":  # an adapter folder holds the adapter, not a copy of the model
        assert not (Path(ckpt.path) / "model.safetensors").exists()


def test_qlora_trains_on_cpu(tiny_chat_model):
    pytest.importorskip("bitsandbytes")
    db = Database()
    steps = 6
    # Mid-training evaluations: test_qlora_gradient_reaches_the_first_layer_even_after_an_evaluation.
    run = train_here(db, tiny_spec(tiny_chat_model, method="qlora", max_steps=steps, batch_size=8,
                                   exact_match_limit=2, learning_rate=2e-2))
    assert run.status == "completed", explain(db, run)
    m = metrics(db, run.id)
    assert sorted(m["loss"]) == list(range(1, steps + 1))
    losses = [m["loss"][s] for s in range(1, steps + 1)]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05, losses
    assert set(m["eval_loss"]) == {steps}
    assert set(m["eval_exact_match"]) == {steps}  # measured after training for QLoRA
    assert (folder_of(db, run.id) / "adapter" / "adapter_model.safetensors").is_file()


class GradientProbe(TrainerCallback):
    """Per step: the norm of the first layer's q_proj LoRA B gradient and how many 4-bit
    weights are in bitsandbytes' CPU inference layout. With LoRA on q_proj only, that gradient
    reaches the loss only through the frozen 4-bit o_proj: it is exactly 0 when no gradient
    flows through the quantised layers."""

    def __init__(self):
        self.norms: dict[int, float] = {}
        self.inference_layout: dict[int, int] = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        states = [getattr(getattr(m, "weight", None), "quant_state", None) for m in model.modules()]
        self.inference_layout[state.global_step + 1] = sum(
            bool(getattr(q, "packing_format_for_cpu", False)) for q in states)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        for name, param in model.named_parameters():
            if "layers.0.self_attn.q_proj" in name and "lora_B" in name:
                self.norms[state.global_step + 1] = 0.0 if param.grad is None else param.grad.norm().item()
                return


def test_qlora_gradient_reaches_the_first_layer_even_after_an_evaluation(tiny_chat_model):
    """The bitsandbytes CPU trap: a no-grad forward in eval mode (an evaluation, a generation)
    repacks the 4-bit weights for a kernel without autograd. Training must keep its gradients
    through the frozen layers at every step, before and after a mid-training evaluation."""
    pytest.importorskip("bitsandbytes")
    db = Database()
    probe = GradientProbe()
    run = train_here(db, tiny_spec(tiny_chat_model, method="qlora", max_steps=3, eval_steps=2, batch_size=8,
                                   method_settings={"target_modules": ["q_proj"]}), (probe,))
    assert run.status == "completed", explain(db, run)
    assert sorted(metrics(db, run.id)["eval_loss"]) == [2, 3]  # step 3 trains after an evaluation
    assert sorted(probe.norms) == [1, 2, 3]
    assert probe.inference_layout == {1: 0, 2: 0, 3: 0}, probe.inference_layout
    # Step 1: B is zero-initialised but its gradient is not (A is random).
    assert all(norm > 0 for norm in probe.norms.values()), probe.norms


class OptimizerGroups(TrainerCallback):
    def __init__(self):
        self.lrs: dict[str, set[float]] = {}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        names = {id(p): n for n, p in model.named_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                kind = "B" if "lora_B" in names[id(p)] else "A" if "lora_A" in names[id(p)] else "other"
                self.lrs.setdefault(kind, set()).add(group["lr"])


def test_loraplus_gives_b_a_higher_learning_rate(tiny_chat_model):
    db = Database()
    groups = OptimizerGroups()
    run = train_here(db, tiny_spec(tiny_chat_model, method="loraplus", max_steps=2,
                                   method_settings={"loraplus_lr_ratio": 16.0}, learning_rate=1e-3), (groups,))
    assert run.status == "completed", explain(db, run)
    # The scheduler may already have stepped: compare the ratio, not absolute values.
    [lr_a], [lr_b] = groups.lrs["A"], groups.lrs["B"]
    assert lr_b == pytest.approx(16 * lr_a)


# ---------------------------------------------------------------------------- packing


def test_packing_trains_and_evaluates(tiny_chat_model):
    db = Database()
    steps, batch = 3, 2
    # An evaluation mid-training (step 2, packed eval set) and the final one (step 3).
    run = train_here(db, tiny_spec(tiny_chat_model, packing=True, max_steps=steps, max_length=256,
                                   batch_size=batch, eval_steps=2, exact_match_limit=2))
    assert run.status == "completed", explain(db, run)
    m = metrics(db, run.id)
    assert sorted(m["loss"]) == list(range(1, steps + 1))
    assert all(math.isfinite(v) and v > 0 for v in m["loss"].values())
    assert sorted(m["eval_loss"]) == [2, 3] and all(math.isfinite(v) for v in m["eval_loss"].values())
    assert sorted(m["eval_exact_match"]) == [2, 3]
    assert (folder_of(db, run.id) / "adapter" / "adapter_model.safetensors").is_file()
    # Several short examples share a row, so an epoch takes fewer steps: unpacked, a step of
    # 2 rows is 2/400 of the 400 training examples (test_worker.py's end-to-end run checks that).
    assert m["epoch"][1] > 2 * batch / 400, m["epoch"]


# -------------------------------------------------------------------------------- OOM


class RaiseOOM(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise torch.OutOfMemoryError("simulated")


def test_out_of_memory_ends_as_oom_with_advice(tiny_chat_model):
    db = Database()
    run = train_here(db, tiny_spec(tiny_chat_model, max_steps=5, batch_size=4, max_length=256), (RaiseOOM(),))
    assert run.status == "oom" and run.finished_at is not None
    assert "simulated" in run.error
    lines = run.error.splitlines()
    for label in ("as configured", "batch size 2", "gradient checkpointing on", "QLoRA (4-bit base)",
                  "max length 128"):
        matching = [line for line in lines if line.startswith(f"- {label}")]
        assert matching and " GiB" in matching[0], (label, run.error)
    # Raised at the end of step 2, before that step's log: step 1 is the last one recorded.
    assert sorted(metrics(db, run.id)["loss"]) == [1]


# ------------------------------------------------------------------ cancel and resume


class CancelAt(TrainerCallback):
    """Asks for a cancel through the database, as the UI would, at ``step``; notes the
    checkpoints recorded by then."""

    def __init__(self, db: Database, run_id: int, step: int, mode: str = "save"):
        self.db, self.run_id, self.step, self.mode = db, run_id, step, mode
        self.checkpoints_before: list[int] | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            self.checkpoints_before = [c.step for c in self.db.list_checkpoints(self.run_id)]
            launch.stop(self.db, self.run_id, self.mode)


def test_cancel_with_discard_leaves_no_checkpoint(tiny_chat_model):
    """The worker-process side of a Stop (the request read from the database after a step) is
    in test_worker.py; what "discard" removes is decided here, in the worker's train."""
    db = Database()
    run = new_run(db, tiny_spec(tiny_chat_model, max_steps=200, save_steps=2, learning_rate=1e-3))
    cancel = CancelAt(db, run.id, 5, "discard")
    assert train.train(db, run.id, extra_callbacks=(cancel,)) == "cancelled"
    assert cancel.checkpoints_before == [2, 4]  # there was something to discard
    run = db.get_run(run.id)
    assert run.status == "cancelled" and run.error is None, explain(db, run)
    assert max(metrics(db, run.id)["loss"]) == 5  # the step in progress ends, then it stops
    assert db.list_checkpoints(run.id) == []
    folder = folder_of(db, run.id)
    assert not (folder / "checkpoints").exists()
    assert not (folder / "adapter").exists()


def test_houlsby_resume_continues_exactly_where_the_checkpoint_left_off(tiny_chat_model):
    """Our own adapter's checkpoints (not PEFT's): cancel (save) at step 3, resume to 6. The
    resumed steps equal an uninterrupted run's, so the adapter weights, optimizer, scheduler and
    data position all came back."""
    db = Database()
    spec = tiny_spec(tiny_chat_model, method="houlsby", method_settings={"r": 8}, max_steps=6,
                     save_steps=100, learning_rate=1e-2)
    whole = train_here(db, spec)
    assert whole.status == "completed", explain(db, whole)

    cut = new_run(db, spec)
    assert train.train(db, cut.id, extra_callbacks=(CancelAt(db, cut.id, 3),)) == "cancelled"
    assert [c.step for c in db.list_checkpoints(cut.id)] == [3]
    assert db.get_run(cut.id).status == "cancelled"
    db.update_run(cut.id, cancel_request=None)  # what launch.resume -> launch.start does
    resumed_at = time.time()
    assert train.train(db, cut.id, resume=True) == "completed", explain(db, db.get_run(cut.id))

    new_steps = sorted(m.step for m in db.metrics_for(cut.id, ["loss"]) if m.wall_time >= resumed_at)
    assert new_steps == [4, 5, 6]
    a, b = metrics(db, whole.id)["loss"], metrics(db, cut.id)["loss"]
    for step in range(1, 7):
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-4), (step, a, b)
