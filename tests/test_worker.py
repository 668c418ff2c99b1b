"""The training worker for real: worker processes, the SQLite history, the tiny chat model.

Nothing is mocked. Each run trains the random 2-layer Llama with the real SmolLM2 tokenizer on
the ``dates`` sample task; a worker process costs ~7 s of imports, so the runs are few steps
long. In-process runs (``train.train``) are used where a test needs a hook inside the Trainer
(simulated OOM, gradient probes, the optimizer's parameter groups).

The helpers at the top are shared with test_worker_reliability.py and test_cli_train.py.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from studio import projects
from studio.db import Database
from studio.runspec import RunSpec
from studio.worker import launch, train

# ---------------------------------------------------------------------------------- helpers

FAST = dict(method="lora", sample_task="dates", max_steps=4, batch_size=4, max_length=64,
            eval_steps=0, save_steps=0, exact_match_limit=0, learning_rate=1e-2, warmup_ratio=0.0)


def tiny_spec(model: Path, **overrides) -> RunSpec:
    return RunSpec(model=str(model), **{**FAST, **overrides})


def new_run(db: Database, spec: RunSpec, project: str = "worker tests"):
    found = db.get_project_by_name(project) or projects.create_project(db, project)
    return launch.create_run(db, found.id, spec)


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_finished(db: Database, run_id: int, timeout: float = 180.0):
    """Poll like the UI does (reconcile + status) until the run is no longer running."""
    def finished():
        launch.reconcile(db)
        run = db.get_run(run_id)
        return run if run.status != "running" else None
    try:
        return wait_for(finished, timeout, interval=0.2, what=f"run {run_id} to finish")
    except AssertionError:
        run = db.get_run(run_id)
        raise AssertionError(f"run {run_id} still {run.status} after {timeout} s; log tail:\n"
                             f"{launch.log_tail(db, run)}") from None


def run_through_worker(db: Database, spec: RunSpec, timeout: float = 180.0):
    run = new_run(db, spec)
    launch.start(db, run.id)
    return wait_finished(db, run.id, timeout)


def metrics(db: Database, run_id: int) -> dict[str, dict[int, float]]:
    """{name: {step: value}}."""
    out: dict[str, dict[int, float]] = {}
    for m in db.metrics_for(run_id):
        out.setdefault(m.name, {})[m.step] = m.value
    return out


def folder_of(db: Database, run_id: int) -> Path:
    return launch.run_folder(db, db.get_run(run_id))


def explain(db: Database, run) -> str:
    return f"status {run.status}; error: {run.error}\nlog tail:\n{launch.log_tail(db, run)}"


@pytest.fixture(autouse=True)
def reap_workers():
    """Kill the workers this test started that are still alive (a failed assertion must not
    leave a training process behind). Only our own children, by pid."""
    before = set(launch._children)
    yield
    for pid in set(launch._children) - before:
        proc = launch._children[pid]
        if proc.poll() is None:
            os.killpg(pid, signal.SIGKILL)  # the worker leads its own session
            proc.wait(timeout=10)


class RaiseOOM(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise torch.OutOfMemoryError("simulated")


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
def test_methods_train_through_the_worker(tiny_chat_model, method, settings):
    """LoRA: test_a_run_trains_end_to_end; LoRA+ (which only changes the optimizer):
    test_loraplus_gives_b_a_higher_learning_rate; QLoRA: the two tests after this one."""
    db = Database()
    steps = 3
    lr = 1e-4 if method == "full" else 1e-2
    # Exact match on two rows runs generation through every method (prompt / prefix included).
    run = run_through_worker(db, tiny_spec(tiny_chat_model, method=method, method_settings=settings,
                                           max_steps=steps, save_steps=steps, exact_match_limit=2,
                                           learning_rate=lr))
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


def test_qlora_trains_on_cpu_through_the_worker(tiny_chat_model):
    pytest.importorskip("bitsandbytes")
    db = Database()
    steps = 6
    # Mid-training evaluations: test_qlora_gradient_reaches_the_first_layer_even_after_an_evaluation.
    run = run_through_worker(db, tiny_spec(tiny_chat_model, method="qlora", max_steps=steps,
                                           batch_size=8, exact_match_limit=2, learning_rate=2e-2))
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
    run = new_run(db, tiny_spec(tiny_chat_model, method="qlora", max_steps=3, eval_steps=2, batch_size=8,
                                method_settings={"target_modules": ["q_proj"]}))
    probe = GradientProbe()
    status = train.train(db, run.id, extra_callbacks=(probe,))
    assert status == "completed", explain(db, db.get_run(run.id))
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
    run = new_run(db, tiny_spec(tiny_chat_model, method="loraplus", max_steps=2,
                                method_settings={"loraplus_lr_ratio": 16.0}, learning_rate=1e-3))
    groups = OptimizerGroups()
    assert train.train(db, run.id, extra_callbacks=(groups,)) == "completed", explain(db, db.get_run(run.id))
    # The scheduler may already have stepped: compare the ratio, not absolute values.
    [lr_a], [lr_b] = groups.lrs["A"], groups.lrs["B"]
    assert lr_b == pytest.approx(16 * lr_a)


# ---------------------------------------------------------------------------- packing


def test_packing_trains_and_evaluates(tiny_chat_model):
    db = Database()
    steps, batch = 3, 2
    # An evaluation mid-training (step 2, packed eval set) and the final one (step 3).
    run = run_through_worker(db, tiny_spec(tiny_chat_model, packing=True, max_steps=steps, max_length=256,
                                           batch_size=batch, eval_steps=2, exact_match_limit=2))
    assert run.status == "completed", explain(db, run)
    m = metrics(db, run.id)
    assert sorted(m["loss"]) == list(range(1, steps + 1))
    assert all(math.isfinite(v) and v > 0 for v in m["loss"].values())
    assert sorted(m["eval_loss"]) == [2, 3] and all(math.isfinite(v) for v in m["eval_loss"].values())
    assert sorted(m["eval_exact_match"]) == [2, 3]
    assert (folder_of(db, run.id) / "adapter" / "adapter_model.safetensors").is_file()
    # Several short examples share a row, so an epoch takes fewer steps: unpacked, a step of
    # 2 rows is 2/400 of the 400 training examples (test_a_run_trains_end_to_end checks that).
    assert m["epoch"][1] > 2 * batch / 400, m["epoch"]


# -------------------------------------------------------------------------------- OOM


def test_out_of_memory_ends_as_oom_with_advice(tiny_chat_model):
    db = Database()
    run = new_run(db, tiny_spec(tiny_chat_model, max_steps=5, batch_size=4, max_length=256))
    assert train.train(db, run.id, extra_callbacks=(RaiseOOM(),)) == "oom"
    run = db.get_run(run.id)
    assert run.status == "oom" and run.finished_at is not None
    assert "simulated" in run.error
    lines = run.error.splitlines()
    for label in ("as configured", "batch size 2", "gradient checkpointing on", "QLoRA (4-bit base)",
                  "max length 128"):
        matching = [line for line in lines if line.startswith(f"- {label}")]
        assert matching and " GiB" in matching[0], (label, run.error)
    # Raised at the end of step 2, before that step's log: step 1 is the last one recorded.
    assert sorted(metrics(db, run.id)["loss"]) == [1]


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


def test_cancel_with_discard_leaves_no_checkpoint(tiny_chat_model):
    db = Database()
    run = new_run(db, tiny_spec(tiny_chat_model, max_steps=200, save_steps=2, learning_rate=1e-3))
    launch.start(db, run.id)
    wait_for(lambda: db.list_checkpoints(run.id), 120, what="a first checkpoint")
    launch.stop(db, run.id, "discard")
    run = wait_finished(db, run.id, timeout=60)
    assert run.status == "cancelled", explain(db, run)
    assert max(metrics(db, run.id)["loss"]) < 200
    assert db.list_checkpoints(run.id) == []
    folder = folder_of(db, run.id)
    assert not (folder / "checkpoints").exists()
    assert not (folder / "adapter").exists()


# ----------------------------------------------------------------- resume (in process)


class CancelAt(TrainerCallback):
    """Asks for a "save" cancel through the database, as the UI would, at ``step``."""

    def __init__(self, db: Database, run_id: int, step: int):
        self.db, self.run_id, self.step = db, run_id, step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            launch.stop(self.db, self.run_id, "save")


def test_houlsby_resume_continues_exactly_where_the_checkpoint_left_off(tiny_chat_model):
    """Our own adapter's checkpoints (not PEFT's): cancel (save) at step 3, resume to 6. The
    resumed steps equal an uninterrupted run's, so the adapter weights, optimizer, scheduler and
    data position all came back."""
    db = Database()
    spec = tiny_spec(tiny_chat_model, method="houlsby", method_settings={"r": 8}, max_steps=6,
                     save_steps=100, learning_rate=1e-2)
    whole = new_run(db, spec)
    assert train.train(db, whole.id) == "completed", explain(db, db.get_run(whole.id))

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
