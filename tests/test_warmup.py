"""The first training step trains (studio.worker.warmup): transformers' warm-up starts at a
learning rate of 0, so a 1-step run learned nothing and a 2-step bake-off showed the same
losses for every method."""

from __future__ import annotations

from safetensors import safe_open

from studio.worker.warmup import first_step_ramp
from worker_helpers import explain, folder_of, metrics, tiny_spec, train_here


def test_the_ramp_starts_above_zero_and_keeps_the_schedule():
    import torch
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cosine = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=3, num_training_steps=10).lr_lambdas[0]
    assert cosine(0) == 0  # what the first step ran at
    ramp = first_step_ramp(cosine, 3)
    assert [round(ramp(k), 4) for k in range(3)] == [0.25, 0.5, 0.75]
    assert [ramp(k) for k in range(3, 10)] == [cosine(k) for k in range(3, 10)]


def test_a_one_step_run_changes_the_adapter(db, tiny_chat_model):
    run = train_here(db, tiny_spec(tiny_chat_model, max_steps=1, warmup_ratio=0.5))
    assert run.status == "completed", explain(db, run)
    # A plain run records its training figures (worker/run_stats.py, counters the trainer keeps)
    # but none of the bake-off's measurements of the saved adapter (studio.bakeoff.measure).
    recorded = set(metrics(db, run.id))
    assert {"trainable_params", "train_seconds", "train_tokens_per_s"} <= recorded
    assert not {"adapter_bytes", "inference_tokens_per_s", "inference_merged"} & recorded
    with safe_open(str(folder_of(db, run.id) / "adapter" / "adapter_model.safetensors"), "pt") as saved:
        b = [saved.get_tensor(k) for k in saved.keys() if "lora_B" in k]
    # LoRA's B starts at zero: any non-zero value is the first step's update.
    assert b and any(t.abs().sum() > 0 for t in b)
