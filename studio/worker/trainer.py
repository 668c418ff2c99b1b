"""The studio's Trainer and the callback that reports to the database.

``StudioTrainer`` is transformers' ``Trainer`` with three additions: it counts the tokens it
trains on (for tokens/s), it computes the loss only where there are labels (``label_loss.py``:
the output projection and cross-entropy at labelled positions, in chunks, equal to the model's own
loss; ``PEFT_STUDIO_FULL_LOGITS_LOSS=1`` turns it off), and it saves / restores our bottleneck
adapters as adapter folders (PEFT models are handled by Trainer itself; a plain model with our
wrappers would otherwise be saved whole). ``StudioCallback`` writes per-step metrics and a
heartbeat, records checkpoints, runs the exact-match evaluation and turns a cancel request from
the UI, or SIGTERM/SIGINT, into a clean stop: at a step end, or during an evaluation within one
eval batch or generated token (``eval_stop.py``). Its writes go through a background writer, so
a locked or full history file never stops training (``resilient.py``).

Under a launcher every rank runs this callback, and only rank 0's writer writes
(``resilient.SilentWriter`` elsewhere, ``ranks.py``). At each step end the ranks agree through
one collective: rank 0's cancel request (only rank 0 reads the history), a signal on any rank,
and the step's tokens of every rank, so that tokens/s counts them all and every rank stops at
the same step (none is left waiting alone in a collective); during an evaluation they agree the
same way at each eval batch and each batch of answers (``eval_stop.py``).

The heartbeat is the supervisor's only sign of life (``launch.reconcile`` kills a worker silent
for ``launch.STALE_HEARTBEAT``), so the loop beats at every point of progress, not only at step
end: each micro-step, each evaluation batch, each generated token of the exact-match
evaluation (``evaluate.reporting``) and each checkpoint, at most every ``BEAT_EVERY_S``. With the
beat goes ``Run.activity``: "evaluating, eval loss k of n batches" or "exact match k of n
answers", which the Train tab shows; each evaluation's duration is recorded as the metric
``eval_seconds``, so the tab's ETA can count the evaluations still to come. Outside the training
loop (loading, the final save, a bake-off's measurements) the writer beats on a timer instead.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from transformers import Trainer, TrainerCallback

from studio.adapters import bottleneck
from studio.db import Database
from studio.sysinfo import peak_rss_bytes
from studio.worker import kernels, label_loss, ranks
from studio.worker.eval_stop import EvaluationInterrupted, StopPoll
from studio.worker.resilient import BackgroundWriter, current_cancel_request, say
from studio.worker.signals import GracefulStop

# How long the loop waits for its records to be written while the history file is healthy
# (a write takes milliseconds); once one wait runs out, it stops waiting (see resilient.py).
SETTLE_STEP_S, SETTLE_SAVE_S = 0.5, 5.0
BEAT_EVERY_S = 0.25  # between two heartbeats at most this often (one coalesced SQLite write)
REQUESTS = (None, "save", "discard")  # a cancel request as the number the ranks add up


class CancelRequested(Exception):
    """Raised after the trainer stopped because the UI asked; carries the mode."""


class StudioTrainer(Trainer):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.tokens_seen = 0  # this rank's
        self.tokens_all = 0  # every rank's, added up at each step end (StudioCallback._agree)
        self.train_seconds = 0.0  # inside training steps only: evals and saves do not count
        # None: not decided yet; "": the label-only loss is on and verified; else why it is off.
        self.full_logits_reason: str | None = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        mask = inputs.get("attention_mask")
        self.tokens_seen += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
        started = time.perf_counter()
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self.train_seconds += time.perf_counter() - started

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's loss computed only at labelled positions (``label_loss.py``); the
        Trainer's own ``compute_loss`` does the rest (loss kwargs, gradient-accumulation scaling).
        The first call is verified against the model's own logits; on any doubt, and with a
        label smoother or a custom loss, the model's own loss is used and the log says why."""
        reason = self.full_logits_reason
        if reason is None:
            reason = self._label_loss_refusal(model)
            if reason:
                self._use_full_logits(reason)
        if reason or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        first = self.full_logits_reason is None
        try:
            with label_loss.label_only(self.accelerator.unwrap_model(model)) as capture:
                loss, outputs = super().compute_loss(model, {**inputs, "logits_to_keep": 1}, True,
                                                     num_items_in_batch)
            unwrapped = self.accelerator.unwrap_model(model)
            problem = label_loss.verify(unwrapped, capture, outputs) if first else None
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # only on the first, unverified call: afterwards errors are real
            if not first:
                raise
            problem = f"the label-only loss failed on the first batch ({type(exc).__name__}: {exc})"
        if problem:
            self._use_full_logits(problem)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if first:
            self.full_logits_reason = ""
            say("loss: label-only (output projection and cross-entropy at labelled positions, "
                "in chunks; set PEFT_STUDIO_FULL_LOGITS_LOSS=1 for the full-logits loss)")
        return (loss, outputs) if return_outputs else loss

    def _label_loss_refusal(self, model) -> str:
        if self.label_smoother is not None or self.compute_loss_func is not None:
            return "a label smoother or custom loss function is set"
        unwrapped = self.accelerator.unwrap_model(model)
        fused = getattr(unwrapped, kernels.FUSED_LOSS_ATTR, None)  # liger's loss: the two cannot stack
        return fused or label_loss.unsupported_reason(unwrapped) or ""

    def _use_full_logits(self, reason: str) -> None:
        self.full_logits_reason = reason
        say(f"loss: the model's own, over the full logits ({reason})")

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """The Trainer's evaluation (eval loss, then the callbacks' exact match), announced to
        the ``StudioCallback`` so the run shows "evaluating" and its duration is recorded."""
        callback = next((c for c in self.callback_handler.callbacks if isinstance(c, StudioCallback)), None)
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if callback is None or dataset is None or isinstance(dataset, dict):
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        batches = math.ceil(len(dataset) / self.args.eval_batch_size) if hasattr(dataset, "__len__") else None
        callback.begin_evaluation(self.state.global_step, batches)
        ok = False
        try:
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            ok = True
            return metrics
        except EvaluationInterrupted:
            if not self.is_in_train:
                raise  # the worker's final evaluation: train.py ends the run
            # Inside the training loop, the evaluation follows a finished step: stop as that
            # step's end would have (StudioCallback.on_step_end). The Trainer then writes the
            # step's checkpoint on "save" and leaves the loop; no metrics: none is complete.
            self.control.should_evaluate = False
            self.control.should_training_stop = True
            self.control.should_save = callback.cancel_mode == "save"
            return {}
        finally:
            callback.end_evaluation(self.state.global_step, recorded=ok)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        keep_4bit_training_layout(model)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if getattr(model, "bottleneck_config", None) is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        bottleneck.save_bottleneck(model, output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        target = model or self.model
        if getattr(target, "bottleneck_config", None) is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from safetensors.torch import load_file

        state = load_file(str(Path(resume_from_checkpoint) / bottleneck.WEIGHTS_NAME))
        target.load_state_dict(state, strict=False)


def keep_4bit_training_layout(model: Any) -> None:
    """Keep bitsandbytes 4-bit layers in training mode during a mid-training evaluation.

    On the CPU, a ``Linear4bit`` that runs a no-grad forward in eval mode repacks its weights for
    an inference kernel without autograd, and keeps them so: every training step after the first
    evaluation would send no gradient through the frozen layers (measured: the first layer's
    q_proj LoRA B gradient became exactly 0). The layer's ``training`` flag changes nothing else
    in its forward: evaluation then uses the ordinary dequantising path (slower on the CPU, same
    function); dropout and every other module stay in eval mode.
    """
    if not getattr(model, "is_loaded_in_4bit", False):
        return
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):  # bitsandbytes' own layer, not PEFT's wrapper
            module.training = True


class StudioCallback(TrainerCallback):
    """Reports to the database through ``writer`` (a ``resilient.BackgroundWriter``): the training
    loop queues its records and never waits on a locked or full history file. Stops after a step
    on a cancel request from the UI or a signal (``stop``, a ``signals.GracefulStop``)."""

    def __init__(self, db: Database, run_id: int, evaluate_exact_match: Any = None, *,
                 writer: BackgroundWriter, stop: GracefulStop | None = None):
        self.db = db
        self.run_id = run_id
        self.evaluate_exact_match = evaluate_exact_match  # (model) -> float, or None
        self.writer = writer
        self.stop = stop
        self.trainer: StudioTrainer | None = None
        self.cancel_mode: str | None = None
        self.stopped_by: str | None = None  # the signal's name when a signal stopped the run
        # The step and metrics of the Trainer's latest evaluation: when it evaluated at the last
        # step, the worker's final evaluation would score the same weights a second time.
        self.evaluated_step: int | None = None
        self.evaluated_metrics: dict[str, float] = {}
        self.saved_steps: set[int] = set()  # checkpoints written to the end by this process
        self._last_busy = 0.0
        self._last_tokens = 0
        self._synced_tokens = 0  # this rank's tokens already added to the trainer's tokens_all
        self._started = time.perf_counter()
        self._process = psutil.Process(os.getpid())
        # What the worker does between steps (``Run.activity``), replaced whole (never mutated):
        # the writer thread reads it when it writes the heartbeat, so the latest state is sent.
        self._activity: dict[str, Any] | None = None
        self._last_beat = -math.inf
        self._eval_started: float | None = None
        self._stop_poll = StopPoll()  # when an evaluation looks for a stop request

    # ---- heartbeat and activity ----
    def _beat(self, force: bool = False) -> None:
        """Queue a heartbeat (coalesced with one already waiting), at most every BEAT_EVERY_S."""
        now = time.monotonic()
        if not force and now - self._last_beat < BEAT_EVERY_S:
            return
        self._last_beat = now
        self.writer.submit(lambda: self.db.heartbeat(self.run_id, self._activity), key="heartbeat")

    def _set_activity(self, **changes: Any) -> None:
        self._activity = {**(self._activity or {}), **changes}

    def begin_evaluation(self, step: int, batches: int | None, part: str = "eval loss") -> None:
        self._eval_started = time.time()
        self._activity = {"phase": "evaluating", "part": part, "done": 0, "total": batches,
                          "step": step, "since": self._eval_started}
        self._beat(force=True)

    def end_evaluation(self, step: int, recorded: bool = True) -> None:
        if recorded and self._eval_started is not None:
            self.writer.log_metrics(step, {"eval_seconds": time.time() - self._eval_started})
        self._eval_started = self._activity = None
        self._beat(force=True)

    def _answered(self, done: int, total: int, batch_end: bool = False) -> None:
        """``evaluate.reporting``'s listener: called after every generated token and after each
        batch of answers. Raises ``EvaluationInterrupted`` on a stop request."""
        now = {"phase": "evaluating", "part": "exact match", "done": done, "total": total}
        first = not self._activity or self._activity.get("total") != total  # "0 of n" is news
        if first or any(self._activity.get(k) != v for k, v in now.items()):
            self._set_activity(**now)
        self._beat(force=first)
        self._check_stop(boundary=batch_end)

    def exact_match(self, scorer: Any, model: Any) -> float | None:
        """``scorer(model)``, the exact match, with its progress, beats and stop checks (see
        ``_answered``); ``EvaluationInterrupted`` leaves it with no score."""
        from studio import evaluate

        self._set_activity(phase="evaluating", part="exact match", done=0, total=None)
        self._beat(force=True)
        with evaluate.reporting(self._answered):
            return scorer(model)

    def _check_stop(self, boundary: bool) -> None:
        """During an evaluation: raise ``EvaluationInterrupted`` when a stop was asked for (a
        cancel request or a signal), having recorded it as ``on_step_end`` does. ``boundary``: a
        point every rank reaches together (``eval_stop.StopPoll``)."""
        signalled = self.stop is not None and self.stop.requested
        if self._stop_poll.due(boundary, signalled) and self._stop_mode(*self._agree()) is not None:
            raise EvaluationInterrupted(self.cancel_mode)

    def _memory_bytes(self) -> float:
        if torch.cuda.is_available():
            return float(torch.cuda.memory_allocated())
        return float(self._process.memory_info().rss)

    def _peak_memory_bytes(self) -> float:
        """The high-water mark so far (the History tab's "peak memory"): a sample of the current
        use at each log misses the short peak inside a step (activations, optimizer update)."""
        if torch.cuda.is_available():
            return float(torch.cuda.max_memory_allocated())
        # Not ru_maxrss: it carries the starting process's peak across fork + exec (see there).
        return float(peak_rss_bytes())

    def on_train_begin(self, args, state, control, **kwargs):
        if self.stop is not None:
            self.stop.training_began()
        self.writer.beat_on_timer(None)  # the loop beats from here on (see the module's docstring)
        self._beat(force=True)

    def on_train_end(self, args, state, control, **kwargs):
        self._activity = None
        self.writer.beat_on_timer({"phase": "finishing", "since": time.time()})

    def on_step_begin(self, args, state, control, **kwargs):
        self._beat()

    def on_substep_end(self, args, state, control, **kwargs):
        self._beat()  # a step of many accumulated micro-batches beats between them

    def on_prediction_step(self, args, state, control, **kwargs):
        if self._activity and self._activity.get("part") == "eval loss":
            self._set_activity(done=self._activity["done"] + 1)
        self._beat()
        self._check_stop(boundary=True)  # each eval-loss batch: every rank has one

    def on_step_end(self, args, state, control, **kwargs):
        self._activity = None
        self._beat(force=True)
        # While writes are quick, wait for them: the history stays as current as the loop.
        self.writer.settle(SETTLE_STEP_S)
        mode = self._stop_mode(*self._agree())
        if mode is not None:
            control.should_training_stop = True
            control.should_save = mode == "save"
            control.should_evaluate = False  # an evaluation due at this step would delay the stop
        return control

    def _stop_mode(self, request: str | None, signal_name: str | None) -> str | None:
        """"save" or "discard" when the run must stop, recorded in ``cancel_mode`` (and the
        signal's name in ``stopped_by``: a signal stops like "save"); None to go on."""
        if signal_name is not None:
            request, self.stopped_by = "save", signal_name
        if request in ("save", "discard"):
            self.cancel_mode = request
            return request
        return None

    def _agree(self) -> tuple[str | None, str | None]:
        """(the cancel request, the signal's name) as every rank sees them, with the step's tokens
        of every rank added to the trainer's ``tokens_all``: one ``all_reduce`` per step
        (``ranks.sum_across``; nothing with one process). Rank 0 alone reads the request from the
        history; a SIGTERM or SIGINT on any rank stops them all."""
        request = current_cancel_request(self.db, self.run_id) if ranks.is_main() else None
        signal_name = self.stop.signal_name if self.stop is not None and self.stop.requested else None
        seen = self.trainer.tokens_seen if self.trainer else 0
        code, sigterm, sigint, tokens = ranks.sum_across([
            REQUESTS.index(request) if request in REQUESTS else 0,
            signal_name == "SIGTERM", signal_name == "SIGINT", seen - self._synced_tokens])
        self._synced_tokens = seen
        if self.trainer is not None:
            self.trainer.tokens_all += tokens
        agreed = "SIGTERM" if sigterm else "SIGINT" if sigint else None
        return REQUESTS[min(code, len(REQUESTS) - 1)], agreed

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or state.global_step == 0:
            return
        now = time.perf_counter()
        tokens = self.trainer.tokens_all if self.trainer else 0
        busy = self.trainer.train_seconds if self.trainer else now - self._started
        values = {k: float(v) for k, v in logs.items()
                  if isinstance(v, (int, float)) and k in ("loss", "learning_rate", "grad_norm", "epoch",
                                                            "eval_loss")}
        if "loss" in values:  # a training log: add throughput and memory
            values["tokens_per_s"] = (tokens - self._last_tokens) / max(busy - self._last_busy, 1e-9)
            values["elapsed_s"] = now - self._started
            values["memory_bytes"] = self._memory_bytes()
            values["peak_memory_bytes"] = self._peak_memory_bytes()
            self._last_busy, self._last_tokens = busy, tokens
        if values:
            self.writer.log_metrics(state.global_step, values, wall_time=time.time())

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        if self.evaluate_exact_match is not None and model is not None:
            score = self.exact_match(self.evaluate_exact_match, model)  # may be interrupted
            if score is not None:
                self.writer.log_metrics(state.global_step, {"eval_exact_match": score}, wall_time=time.time())
        # Only a whole evaluation: train.py reuses it as the final one when it was at the last step.
        self.evaluated_step, self.evaluated_metrics = state.global_step, dict(metrics or {})

    def on_save(self, args, state, control, **kwargs):
        self._beat(force=True)
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            step = state.global_step  # bound now: ``state`` moves on before the write may happen
            self.saved_steps.add(step)
            self.writer.submit(lambda: self.db.add_checkpoint(self.run_id, step, str(folder)))
        self.writer.submit(self._forget_removed_checkpoints)
        self.writer.settle(SETTLE_SAVE_S)

    def _forget_removed_checkpoints(self) -> None:
        # Trainer keeps the last ``save_total_limit`` folders and deletes older ones before
        # on_save: forget their rows too, so the history lists only checkpoints that exist.
        gone = [c.id for c in self.db.list_checkpoints(self.run_id) if not Path(c.path).is_dir()]
        if gone:
            self.db.delete_checkpoints(self.run_id, gone)
