"""The worker's ``main``: train one run from its RunSpec and report everything to the database.

Life of a run as this module sees it: status ``running`` with our pid → model, method and data
built → transformers ``Trainer`` with ``StudioCallback`` → ``completed`` (or ``cancelled`` on a
cancel request or SIGTERM/SIGINT (``signals.py``), read at step ends and within an evaluation,
the final one included (``eval_stop.py``), ``oom`` with advice on out-of-memory,
``failed`` with "disk full: ..." when the disk filled up (``diskspace.py``) or the traceback tail on
any other error). A killed worker cannot write its own end: ``launch.reconcile`` marks it failed.
Database writes ride out a locked or full history file (``resilient.py``): the training loop
queues its records, and the writes that start and end a run are retried for minutes.

Under a launcher (several processes, ``ranks.py``) every rank runs this module; only rank 0
writes the run's records and files, and decides before loading (precision, the dataset a sample
task becomes, the checkpoint to resume) for every rank. A rank that loses a peer mid-collective
leaves the run's end to the supervisor, whose reading of the launcher's report names the rank
that died (``launch.reconcile``).
"""

from __future__ import annotations

import argparse
import gc
import os
import time
import shutil
import traceback
from pathlib import Path
from typing import Any

import torch

from studio import config
from studio.db import Database, RunStatus, utcnow
from studio.methods import get_method
from studio.run_setup import DeviceFacts
from studio.runspec import RunSpec
from studio.trackers import live as tracking
from studio.worker import diskspace, eval_stop, prepare, ranks
from studio.worker.resilient import BackgroundWriter, Patient, SilentWriter, say
from studio.worker.run_stats import training_stats
from studio.worker.signals import GracefulStop, StoppedBySignal
from studio.worker.trainer import StudioCallback, StudioTrainer
from studio.worker.warmup import WarmupFromFirstStep

QUANTISED_EM_NOTE = ("exact match is measured after training for QLoRA: generating with the 4-bit "
                     "model mid-training would switch bitsandbytes to a kernel without gradients")


def run_dir(db: Database, run_id: int) -> Path:
    run = db.get_run(run_id)
    project = db.get_project(run.project_id)
    return config.child_path(config.child_path(config.projects_dir(), project.folder) / "runs", run.folder)


def exact_match_scorer(spec: RunSpec, tokenizer: Any, eval_rows: Any = None):
    """``(model) -> exact match or None`` for the trainer's evaluations and the final score, or
    None when nothing can be scored. A sample task is scored on its own eval split with its own
    normalisation (it wins if a spec names a dataset too); an imported dataset on its canonical
    ``eval_rows`` (``studio.evaluate.score_dataset``). A dataset that cannot be scored (plain
    text, empty eval split) gets no scorer and a line in the run's log saying why, since the
    History tab would otherwise just show no exact match."""
    if spec.exact_match_limit <= 0 or (not spec.sample_task and eval_rows is None):
        return None
    from studio import evaluate

    if spec.sample_task:
        def measure(model: Any) -> float | None:
            return evaluate.score_task(model, tokenizer, spec.sample_task, limit=spec.exact_match_limit).exact_match
    else:
        # The rows are chosen once: every evaluation of the run answers the same prompts.
        examples = evaluate.eval_examples(eval_rows, tokenizer, spec.exact_match_limit)
        if not examples.references:
            print(f"exact match not measured: {examples.reason}", flush=True)
            return None
        if examples.skipped:
            print(f"exact match: {examples.skipped} eval rows skipped (no final assistant answer, "
                  "or one too long to match)", flush=True)

        def measure(model: Any) -> float | None:
            score = evaluate.score_examples(model, tokenizer, examples)
            return None if score is None else score.exact_match

    def score(model: Any) -> float | None:
        was_training = model.training
        model.eval()
        model.config.use_cache = True
        try:
            return measure(model)
        finally:
            model.config.use_cache = False
            model.train(was_training)
    return score


def dataset_eval_rows(db: Database, spec: RunSpec, dataset_id: int | None) -> Any:
    """The imported dataset's canonical eval rows when exact match is scored on them (a run on
    a dataset, not a sample task), else None. Memory-mapped: only the rows scored are read."""
    if spec.sample_task or dataset_id is None or spec.exact_match_limit <= 0:
        return None
    from studio.data import load_dataset_split

    return load_dataset_split(db, dataset_id, "eval")


def training_arguments(spec: RunSpec, compute: prepare.Compute, output_dir: Path, has_eval: bool,
                       method_optim: dict[str, Any] | None = None):
    """``method_optim``: a method that is its own optimizer (GaLore, APOLLO) names it here
    (``MethodSpec.trainer_optim``: ``optim`` and its ``optim_target_modules`` / ``optim_args``),
    in place of the run's optimizer."""
    from transformers import TrainingArguments

    optim = {"adamw": "adamw_torch", "adamw8bit": "adamw_bnb_8bit", "sgd": "sgd"}[spec.optimizer]
    method_optim = dict(method_optim or {})
    optim = method_optim.pop("optim", optim)
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=spec.max_steps if spec.max_steps > 0 else -1,
        num_train_epochs=spec.epochs,
        per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.grad_accum,
        learning_rate=spec.learning_rate,
        lr_scheduler_type=spec.lr_scheduler,
        warmup_steps=spec.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=spec.weight_decay,
        optim=optim,
        logging_steps=1,
        eval_strategy="steps" if has_eval and spec.eval_steps > 0 else "no",
        eval_steps=spec.eval_steps or None,
        save_strategy="steps" if spec.save_steps > 0 else "no",
        save_steps=spec.save_steps or 500,
        save_total_limit=3,
        seed=spec.seed,
        data_seed=spec.seed,
        bf16=compute.bf16,
        fp16=compute.fp16,
        use_cpu=compute.device == "cpu",
        # several processes (ranks.py): gloo on a CPU, and the group's timeout, not torch's 30 min
        ddp_backend="gloo" if compute.device == "cpu" and ranks.distributed() else None,
        ddp_timeout=ranks.timeout_s(),
        report_to=list(spec.trackers) or "none",  # transformers' callbacks, pointed by studio/trackers/live.py
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **method_optim,
    )


def train(db: Database, run_id: int, resume: bool = False, extra_callbacks: tuple = (),
          stop: GracefulStop | None = None) -> str:
    """Train run ``run_id``; returns the final status. Exceptions end as a status, not a crash.

    ``stop``: the process's signal handlers (``main``); None when called in-process (tests)."""
    patient = Patient(db)  # the writes that start and end the run outlast a locked file
    run = patient.get_run(run_id)
    spec = RunSpec.from_dict(run.spec).validate()
    folder = run_dir(db, run_id)
    main = ranks.is_main()  # only rank 0 writes (ranks.py); the others read the history only
    if ranks.distributed():
        say(f"rank {ranks.rank()} of {ranks.world_size()}: run {run_id}")
    if main:
        folder.mkdir(parents=True, exist_ok=True)
        # No cancel_request=None here: launch.start clears an old request when it starts the
        # worker, and a Stop clicked while this process was still importing must not be forgotten.
        now = utcnow()
        patient.update_run(run_id, status=RunStatus.RUNNING.value, pid=ranks.launcher_pid(), started_at=now,
                           heartbeat_at=now, finished_at=None, error=None, exit_code=None)
    reserve = diskspace.Reserve(folder) if main else None  # the space to record a full disk in
    if reserve is not None:
        reserve.claim()
    writer = BackgroundWriter(db, run_id) if main else SilentWriter()
    live = Live()
    try:
        try:
            if stop is not None:
                stop.arm()
            status, fields = _train(db, writer, run_id, spec, folder, resume, extra_callbacks, stop, live)
        finally:
            if stop is not None:  # from here on a signal waits for the end to be recorded
                stop.training_ended()
    except StoppedBySignal as exc:
        status, fields = RunStatus.CANCELLED.value, {
            "error": f"Stopped by {exc.signal_name} before training began; there was nothing to save."}
    except torch.OutOfMemoryError as exc:
        status, fields = RunStatus.OOM.value, {"error": f"Out of memory: {exc}\n\n{oom_advice(spec, live.device)}"}
    except Exception as exc:  # every other failure: recorded for the user, then the process exits 1
        status, fields = RunStatus.FAILED.value, _failure(db, run_id, exc, folder, live)
    tracking.end(status, say)  # the MLflow run ends as the run did
    if reserve is not None:
        reserve.release()  # just before the last writes: on a full disk, SQLite needs this space
    writer.close()
    if main and fields is not None:  # not after a lost peer: the supervisor records that end
        patient.update_run(run_id, status=status, finished_at=utcnow(), **fields)
    return status


def _failure(db: Database, run_id: int, exc: Exception, folder: Path, live: "Live") -> dict | None:
    """The failed run's fields to record, with the error for the user; None when this process
    must not record the end: a rank other than 0, or rank 0 after a peer was lost (the launcher's
    report, read by ``launch.reconcile``, names the rank that died, which rank 0 cannot know).
    Either way the traceback goes to worker.log."""
    if not ranks.is_main() or ranks.lost_peer(exc):
        say(f"rank {ranks.rank()}: {traceback.format_exc()[-4000:]}")
        return None
    complete = live.complete_checkpoints(db, run_id)
    full = diskspace.diagnose(exc, folder, live.trainer, complete, live.saving_adapter)
    if full:  # the record says what to do; the log keeps the traceback
        say(traceback.format_exc()[-4000:])
    return {"error": full or traceback.format_exc()[-4000:]}


class Live:
    """What ``train`` needs to know about a run that failed mid-way: the trainer (for the size of
    a checkpoint), the checkpoints written to the end, and whether the adapter was being saved."""

    def __init__(self) -> None:
        self.trainer: Any = None
        self.callback: StudioCallback | None = None
        self.saving_adapter = False
        self.device: DeviceFacts | None = None  # the device as the run started on it

    def complete_checkpoints(self, db: Database, run_id: int) -> set[int]:
        steps = set(self.callback.saved_steps) if self.callback is not None else set()
        try:  # a read: works on a full disk and under another writer's lock
            steps |= {c.step for c in db.list_checkpoints(run_id)}
        except Exception:
            pass
        return steps


def _train(db: Database, writer: BackgroundWriter, run_id: int, spec: RunSpec, folder: Path, resume: bool,
           extra_callbacks: tuple, stop: GracefulStop | None, live: Live) -> tuple[str, dict]:
    """Trains; returns (final status, the run's other fields to record with it)."""
    torch.manual_seed(spec.seed)
    ranks.start_group("cuda" if torch.cuda.is_available() else "cpu")
    tracking.begin(db, run_id, spec, folder, resume, ranks.is_main(), say)  # before the model: fails fast
    # Rank 0 decides, every rank follows (ranks.share): one precision probe, one sample-task
    # import, one download or conversion of the model before every rank loads it.
    decided = prepare.decide(db, run_id, spec, folder, resume) if ranks.is_main() else None
    compute, dataset_id, checkpoint = ranks.share(decided)
    live.device = compute.facts  # what the OOM advice estimates for
    model, tokenizer, arch, params = prepare.build_model(spec, compute)
    train_set, eval_set, collator = prepare.build_data(db, spec, dataset_id, tokenizer)
    quantised = getattr(model, "is_loaded_in_4bit", False)
    # A bake-off scores the saved adapter after training (measure_for_bakeoff); scoring the
    # training model too, at the final evaluation, would only cost time. Under a launcher every
    # rank scores (greedy: the same answers; rank 0 records): no rank then waits in a collective
    # for rank 0's generation, and FSDP's sharded forward needs every rank anyway.
    bakeoff = db.bakeoff_for_run(run_id)
    scorer = None if bakeoff is not None else exact_match_scorer(
        spec, tokenizer, dataset_eval_rows(db, spec, dataset_id))
    callback = StudioCallback(db, run_id, None if quantised else scorer, writer=writer, stop=stop)
    method = get_method(spec.method)
    # The method's own parameter groups (LoRA+), or None: the Trainer builds its default optimizer.
    optimizer = (method.optimizer(model, params, spec.learning_rate, spec.weight_decay)
                 if method.optimizer else None)
    optimizers = (optimizer, None)
    method_optim = method.trainer_optim(arch, params) if method.trainer_optim else None
    trainer = StudioTrainer(
        model=model, args=training_arguments(spec, compute, folder / "checkpoints", eval_set is not None,
                                             method_optim),
        train_dataset=train_set, eval_dataset=eval_set, data_collator=collator, processing_class=tokenizer,
        callbacks=[callback, WarmupFromFirstStep(), *extra_callbacks], optimizers=optimizers,
    )
    callback.trainer = live.trainer = trainer
    live.callback = callback
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        if stop is not None:
            stop.training_ended()
    wall = time.perf_counter() - started

    if callback.cancel_mode is None:
        final = training_stats(trainer, model, wall)  # before the evaluations raise the peak
        try:
            final.update(eval_stop.final_scores(trainer, callback, model, scorer, eval_set is not None))
        except eval_stop.EvaluationInterrupted:  # a stop during the final evaluation
            if callback.cancel_mode == "save":
                eval_stop.keep_last_step(trainer)
    if callback.cancel_mode is not None:
        if callback.cancel_mode == "discard" and ranks.is_main():
            shutil.rmtree(folder / "checkpoints", ignore_errors=True)
            writer.submit(lambda: db.delete_checkpoints(run_id))  # after the queued checkpoint rows
        if callback.stopped_by is None:
            return RunStatus.CANCELLED.value, {}
        step = trainer.state.global_step
        return RunStatus.CANCELLED.value, {"error": (
            f"Stopped by {callback.stopped_by} at step {step}, like Stop and save: the checkpoint at "
            f"step {step} was kept and Resume continues from there.")}

    step = trainer.state.global_step
    live.saving_adapter = True
    trainer.save_model(str(folder / "adapter"))
    live.saving_adapter = False
    writer.log_metrics(step, final)
    if bakeoff is not None and ranks.is_main():  # after training: no rank waits for it
        # Free the training model, optimizer and data before loading the saved adapter again.
        live.trainer = live.callback = None
        del trainer, model, callback, optimizer, optimizers, train_set, eval_set
        gc.collect()
        measure_for_bakeoff(Patient(db), run_id, bakeoff.id, spec, folder / "adapter", step,
                            dataset_eval_rows(db, spec, dataset_id))
    return RunStatus.COMPLETED.value, {"exit_code": 0}


def measure_for_bakeoff(db: Database, run_id: int, bakeoff_id: int, spec: RunSpec, adapter: Path,
                        step: int, eval_rows: Any = None) -> None:
    """The bake-off's post-training figures. A failure here is noted on the bake-off, and the
    run still completes: its training and its saved adapter are sound. ``eval_rows``: the
    imported dataset's eval rows to score exact match on (see ``dataset_eval_rows``)."""
    from studio.bakeoff.measure import measure_trained

    db.heartbeat(run_id)
    try:
        # Without the note the table would show an empty exact match column (and plot minus
        # eval loss) without a word; a failure below replaces it, being the bigger news.
        values = measure_trained(spec, adapter, spec.exact_match_limit,
                                 progress=lambda text: print(text, flush=True), eval_rows=eval_rows,
                                 unscored=lambda why: db.add_bakeoff_note(bakeoff_id, run_id, why))
        db.log_metrics(run_id, step, values)
    except Exception:
        trace = traceback.format_exc()
        print(trace, flush=True)
        db.add_bakeoff_note(bakeoff_id, run_id, "measurement after training failed: "
                            + trace.strip().splitlines()[-1][:300])
    db.heartbeat(run_id)


def oom_advice(spec: RunSpec, device: DeviceFacts | None = None) -> str:
    """What would fit (``studio/fit_advice.py``, the rule the Method and Train tabs show too), on
    ``device`` as the run started (its free memory before the model was loaded; None: read now)."""
    from studio import fit_advice

    try:
        return fit_advice.oom_text(spec, device or prepare.device_now())
    except Exception as exc:  # advice is best effort; the OOM itself is what matters
        return f"(could not compute advice: {exc})"


def main(argv: list[str] | None = None, stop: GracefulStop | None = None) -> int:
    """The worker process. ``stop``: signal handlers already installed (``__main__`` does it
    before the heavy imports); installed here otherwise."""
    parser = argparse.ArgumentParser(prog="python -m studio.worker")
    parser.add_argument("run_id", type=int)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    if stop is None:
        stop = GracefulStop()
        stop.install()
    db = Database()
    status = train(db, args.run_id, resume=args.resume, stop=stop)
    ranks.end_group()
    say(f"run {args.run_id}: {status}" if ranks.is_main() else f"rank {ranks.rank()}, run {args.run_id}: {status}")
    if stop.requested:  # a shutdown is no time to start the next training
        say(f"not starting the next queued run: stopped by {stop.signal_name}")
    else:
        dispatch_next(db)
    stop.ignore_from_now()
    return 0 if status in (RunStatus.COMPLETED.value, RunStatus.CANCELLED.value) else 1


def dispatch_next(db: Database) -> None:
    """Start the next queued run, now that this one has let go of the device: this is what
    advances a bake-off with the UI closed. Under torchrun only rank 0 dispatches."""
    if os.environ.get("RANK", "0") != "0":
        return
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    from studio.runs import launch

    try:
        started = launch.dispatch(db)
    except Exception as exc:  # the next run waits for the next poll; this run's end stands
        print(f"could not start the next queued run: {exc}", flush=True)
        return
    if started is not None:
        print(f"started queued run {started.id} ({started.name}), pid {started.pid}", flush=True)
