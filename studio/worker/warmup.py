"""A learning-rate warm-up whose first step trains.

transformers' warm-up is ``lr × k / w`` at optimizer step k (k = 0, 1, …, w − 1): the first step
runs at learning rate 0 and changes nothing. A 1-step run then learns nothing, and in a 2-step
bake-off every method shows the same two losses (the second is measured on weights the first
step never moved). ``WarmupFromFirstStep`` replaces the ramp with ``lr × (k + 1) / (w + 1)``:
every warm-up step trains, the peak is still reached at step w, and the schedule after the
warm-up (linear or cosine decay) is untouched, so a run's later steps are as before. Chosen over
"no warm-up for short runs" because it needs no threshold and also fixes the first step of long
runs.

A callback rather than a scheduler of our own: the Trainer builds its scheduler (and restores it
on resume) from ``TrainingArguments``; at ``on_train_begin`` both have happened, and only the
warm-up factors are swapped, keeping the scheduler's step count.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback


def first_step_ramp(schedule: Any, warmup: int) -> Any:
    """``schedule``'s factor from step ``warmup`` on; ``(k + 1) / (warmup + 1)`` before. Every
    transformers warm-up ramps to the full rate (factor 1) at step ``warmup``; that value is not
    read from the schedule, since a run shorter than its warm-up never gets there (linear decay
    then says 0 at step ``warmup``)."""
    def factor(step: int) -> float:
        return (step + 1) / (warmup + 1) if step < warmup else schedule(step)
    return factor


class WarmupFromFirstStep(TrainerCallback):
    """Makes the Trainer's warm-up start above zero (see the module docstring)."""

    def on_train_begin(self, args: Any, state: Any, control: Any, lr_scheduler: Any = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate may wrap it
        lambdas = getattr(scheduler, "lr_lambdas", None)
        warmup = args.get_warmup_steps(state.max_steps) if state.max_steps > 0 else 0
        if not lambdas or warmup < 1 or lambdas[0](0) != 0:
            return  # no warm-up (a constant schedule ignores it), or not a LambdaLR
        scheduler.lr_lambdas = [first_step_ramp(f, warmup) for f in lambdas]
        # The scheduler set the current rate from the old factors when it was built (or resumed).
        step = scheduler.last_epoch
        rates = [base * f(step) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, rate in zip(scheduler.optimizer.param_groups, rates):
            group["lr"] = rate
        scheduler._last_lr = rates
