"""A stop asked for during an evaluation: noticed within one eval batch or one generated token,
and ended as a stop between two steps would be.

A cancel request ("Stop and save" / "Stop and discard", ``peft-studio stop``) and SIGTERM/SIGINT
are read at each step end (``StudioCallback.on_step_end``). An evaluation runs between two step
ends (the eval loss pass, then the exact-match generation, minutes on a CPU), so the worker also
looks while evaluating: at each eval-loss batch (``on_prediction_step``) and at each generated
token (``evaluate.reporting``'s listener). When a stop is found, ``EvaluationInterrupted`` is
raised out of the evaluation, and:

- inside the training loop, ``StudioTrainer.evaluate`` turns it into the same stop a step end
  makes: the step the evaluation followed is the last finished one, its checkpoint is written
  ("save") or not ("discard"), and the loop ends;
- after training (the worker's final evaluation, ``final_scores``), ``train.py`` catches it and
  ``keep_last_step`` writes that checkpoint when the mode is "save".

Either way nothing of the interrupted evaluation is recorded as if it were complete: no exact
match from the answers so far, no ``eval_seconds``. An eval loss whose pass had finished before
the stop came is a complete score and stays.

How often to look: the signal flag costs nothing and is read every time; the history is read at
most every ``POLL_EVERY_S`` (one SQLite read; a token takes milliseconds). Under a launcher the
ranks must stop at the same point, or one would wait alone in a collective (FSDP's forward has
them at every token): they look only at points every rank reaches together (each eval-loss
batch, each batch of answers: every rank evaluates the same rows) and agree through one
``all_reduce`` (``StudioCallback._agree``), as they do at each step end.
"""

from __future__ import annotations

import math
import time
from typing import Any

from studio.worker import ranks

POLL_EVERY_S = 0.25  # between two reads of the history's cancel request during an evaluation


class EvaluationInterrupted(Exception):
    """A stop was asked for during an evaluation; the callback's ``cancel_mode`` and
    ``stopped_by`` say which. Raised out of the evaluation so that it ends at once."""

    def __init__(self, mode: str):
        super().__init__(f"evaluation interrupted by a stop ({mode})")
        self.mode = mode


class StopPoll:
    """When an evaluation looks for a stop (see the module's docstring)."""

    def __init__(self, every_s: float = POLL_EVERY_S):
        self.every_s = every_s
        self._last = -math.inf

    def due(self, boundary: bool, signalled: bool) -> bool:
        """Look now? ``boundary``: a point every rank reaches at once (an eval-loss batch, the end
        of a batch of answers); ``signalled``: this process has received SIGTERM/SIGINT."""
        if ranks.distributed():
            return boundary  # the look is a collective: only where every rank makes it
        now = time.monotonic()
        if signalled or now - self._last >= self.every_s:
            self._last = now
            return True
        return False


def final_scores(trainer: Any, callback: Any, model: Any, scorer: Any, has_eval: bool) -> dict[str, float]:
    """The worker's evaluation after training: eval loss and exact match of the final weights,
    as metrics for the last step. Raises ``EvaluationInterrupted`` on a stop (nothing returned)."""
    step = trainer.state.global_step
    final: dict[str, float] = {}
    if has_eval:
        # When eval_steps divides the last step the Trainer has just evaluated these very weights
        # (eval loss and exact match): reuse that instead of making the user wait for it twice.
        already = callback.evaluated_step == step
        evaluated = callback.evaluated_metrics if already else trainer.evaluate()
        final.update({k: v for k, v in evaluated.items() if k == "eval_loss"})
    # The evaluate() above already ran the callback's exact match, unless the callback has no
    # scorer (QLoRA) or there was no eval split to evaluate.
    if scorer is not None and (callback.evaluate_exact_match is None or not has_eval):
        callback.begin_evaluation(step, None, part="exact match")
        try:  # as a Trainer evaluation: progress, beats and the stop checks
            score = callback.exact_match(scorer, model)
        finally:
            callback.end_evaluation(step, recorded=False)  # not timed: no evaluation follows
        if score is not None:
            final["eval_exact_match"] = score
    return final


def keep_last_step(trainer: Any) -> None:
    """After training, on "Stop and save" during the final evaluation: the checkpoint of the
    last finished step, as a stop at a step end writes it (the Trainer's own save, then
    ``on_save``, which records its row), unless the Trainer saved that step already. Every rank
    calls this (a sharded model saves collectively); rank 0, which alone may see the folder on a
    disk that is not shared, decides for all."""
    import os

    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    step = trainer.state.global_step
    folder = os.path.join(trainer.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
    if ranks.share(os.path.isdir(folder) if ranks.is_main() else None):
        return
    trainer._save_checkpoint(trainer.model_wrapped, trial=None)
    trainer.control = trainer.callback_handler.on_save(trainer.args, trainer.state, trainer.control)
