"""DDP on the CPU with gloo, the worker's multi-process path (issue 18): real worker processes
under a real ``torchrun``, real signals, the real history.

One two-rank run, started through ``peft-studio train --nproc-per-node 2`` and shared by the
checks of a finished run (module scope: a torchrun start costs several seconds); its one-process
reference with twice the batch trains in this process with the worker's own ``train``. One more
two-rank run is killed (kill -9 of rank 1), resumed under torchrun and stopped from the history.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import _reap_workers
from studio import projects
from studio.db import Database
from studio.runs import launch, liveness, multiprocess
from studio.runspec import RunSpec, RunSpecError
from studio.worker import train
from worker_helpers import explain, metrics, new_run, tiny_spec, wait_finished, wait_for

B, STEPS = 2, 4  # per-rank batch; the one-process reference trains on 2 × B
# LoRA dropout off: each rank draws its own dropout masks, which no single process can repeat.
# A dataset without an eval split: the final evaluation would cost more than the training.
SAME = dict(sample_task=None, max_steps=STEPS, save_steps=STEPS, learning_rate=1e-2,
            method_settings={"lora_dropout": 0.0})
# Measured: the two-rank losses equal the reference's to within 1e-6 (fp32: step 2 10.5146465
# against 10.5146456; the differences are the order of the gradient all-reduce's additions and
# each half-batch padded to its own longest row). Rank 1 training on rank 0's half, or a loss
# normalised per rank instead of over both ranks' tokens, moves them by 1e-2 and more.
LOSS_TOLERANCE = 1e-4


@pytest.fixture(scope="module", autouse=True)
def studio_home(tmp_path_factory):
    """One studio home for the module (replaces conftest's per-test home), with its environment."""
    home = tmp_path_factory.mktemp("ddp-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PEFT_STUDIO_HOME", str(home))
        patch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("PEFT_STUDIO_PRECISION_PROBE", "fp32")
        yield home
        _reap_workers(home)  # launchers and ranks alike: nothing of this module may outlive it


@pytest.fixture(scope="module")
def db(studio_home):
    database = Database()
    yield database
    database.close()


def train_only_dataset(db, project: str) -> int:
    """The dates task's 400 training rows as a dataset of ``project`` (created), no eval split."""
    from studio.data import import_dataset
    from studio.samples import get_task

    found = db.get_project_by_name(project) or projects.create_project(db, project)
    return import_dataset(db, found.id, get_task("dates").train_path, format="alpaca", eval_ratio=0).dataset.id


@pytest.fixture(scope="module")
def two_ranks(db, tiny_chat_model, tmp_path_factory):
    """(the CLI's completed process, the run) of a two-rank run through ``peft-studio train``."""
    path = tmp_path_factory.mktemp("ddp-spec") / "runspec.json"
    tiny_spec(tiny_chat_model, batch_size=B, dataset_id=train_only_dataset(db, "ddp"), **SAME).save(path)
    done = subprocess.run([sys.executable, "-m", "studio", "train", str(path), "--nproc-per-node", "2",
                           "--project", "ddp"], capture_output=True, text=True, timeout=300, env={**os.environ})
    [run] = db.list_runs(db.get_project_by_name("ddp").id)
    return done, db.get_run(run.id)


@pytest.fixture(scope="module")
def reference(db, tiny_chat_model, two_ranks):
    """The same run in one process with twice the batch (after the two-rank run: never beside it)."""
    spec = tiny_spec(tiny_chat_model, batch_size=2 * B, dataset_id=train_only_dataset(db, "reference"), **SAME)
    run = new_run(db, spec, project="reference")
    train.train(db, run.id)
    gc.collect()
    return db.get_run(run.id)


def rank_processes(launcher: int) -> dict[int, psutil.Process]:
    """{rank: process} of a torchrun launcher's workers (each in a session of its own)."""
    found = {}
    for child in psutil.Process(launcher).children(recursive=True):
        try:
            if "studio.worker" in child.cmdline():
                found[int(child.environ()["RANK"])] = child
        except (psutil.Error, KeyError):
            continue
    return found


# ---------------------------------------------------------------- the spec, the command


def test_the_spec_bounds_the_process_settings_with_their_reasons():
    base = RunSpec(sample_task="dates")
    assert base.nproc_per_node == 0 and base.distributed == "ddp" and base.offload is False
    for change, words in [({"nproc_per_node": 65}, ("nproc_per_node", "at most 64")),
                          ({"nproc_per_node": -1}, ("nproc_per_node", "at least 0")),
                          ({"distributed": "horovod"}, ("distributed", "ddp, fsdp, zero2, zero3")),
                          ({"distributed": "fsdp", "nproc_per_node": 1}, ("distributed", "more than one")),
                          ({"offload": True}, ("offload", "fsdp"))]:
        with pytest.raises(RunSpecError) as refused:
            RunSpec(sample_task="dates", **change).validate()
        assert all(w in str(refused.value) for w in words), (change, str(refused.value))


def test_the_launch_command_is_torchrun_for_several_processes_and_splits_the_threads(db, tiny_chat_model):
    one = new_run(db, tiny_spec(tiny_chat_model), project="commands")
    two = new_run(db, tiny_spec(tiny_chat_model, nproc_per_node=2), project="commands")
    folder = launch.run_folder(db, two)
    assert launch._command(one, launch.run_folder(db, one), False)[1:] == ["-m", "studio.worker", str(one.id)]
    command = launch._command(two, folder, True)
    assert command[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                           "studio.worker", str(two.id), "--resume"]
    env = multiprocess.environment(2, {"PATH": "/bin"})
    assert env["OMP_NUM_THREADS"] == str(max(1, multiprocess.cpu_cores() // 2))
    assert multiprocess.environment(2, {"OMP_NUM_THREADS": "3"})["OMP_NUM_THREADS"] == "3"  # the user's
    assert "OMP_NUM_THREADS" not in multiprocess.environment(1, {})


def test_more_processes_than_gpus_is_refused_before_a_run_exists(db, tiny_chat_model, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # what launch counts GPUs by, before any probe
    project = projects.create_project(db, "four on two")
    with pytest.raises(RunSpecError, match="4 processes need 4 GPUs.*shows 2"):
        launch.create_run(db, project.id, tiny_spec(tiny_chat_model, nproc_per_node=4))
    assert db.list_runs(project.id) == []
    assert multiprocess.gpu_refusal(RunSpec(nproc_per_node=4), 0) is None  # a CPU: gloo, any count


# ---------------------------------------------------------------- a finished two-rank run


def test_two_ranks_under_torchrun_complete_and_rank_0_alone_writes(db, two_ranks):
    done, run = two_ranks
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert run.status == "completed", explain(db, run)
    log = launch.log_tail(db, run, 400)
    assert "rank 0 of 2" in log and "rank 1 of 2" in log, log
    # Metrics once per step: every (name, step) row is written once, by rank 0.
    rows = [(m.name, m.step) for m in db.metrics_for(run.id)]
    assert len(rows) == len(set(rows)), sorted(rows)
    assert sorted(metrics(db, run.id)["loss"]) == list(range(1, STEPS + 1))
    [checkpoint] = db.list_checkpoints(run.id)
    assert checkpoint.step == STEPS
    files = {p.name for p in Path(checkpoint.path).iterdir()}
    # The Trainer's per-rank RNG states prove two ranks trained; the rest is rank 0's alone.
    assert {"rng_state_0.pth", "rng_state_1.pth", "adapter_model.safetensors", "trainer_state.json"} <= files
    assert (launch.run_folder(db, run) / "adapter" / "adapter_model.safetensors").is_file()
    # rank 0 records the end, then the launcher and both ranks exit
    wait_for(lambda: liveness.run_processes(run.id) == [], 30, what="the launcher and its ranks to exit")


def test_two_ranks_with_batch_b_lose_as_one_process_with_2b(db, two_ranks, reference):
    assert reference.status == "completed", explain(db, reference)
    ranks2, one = metrics(db, two_ranks[1].id)["loss"], metrics(db, reference.id)["loss"]
    assert sorted(ranks2) == sorted(one) == list(range(1, STEPS + 1))
    for step in one:
        assert abs(ranks2[step] - one[step]) <= LOSS_TOLERANCE, (step, ranks2, one)
    assert one[STEPS] < one[1]  # it trained: equal losses of a model that never moved prove little


def test_tokens_per_second_counts_every_ranks_tokens(db, two_ranks, reference):
    """Both runs train on the same examples, so all ranks' tokens must equal the reference's."""
    def tokens(run_id):
        final = {k: v[max(v)] for k, v in metrics(db, run_id).items()}
        return final["train_tokens_per_s"] * final["train_step_seconds"]
    assert tokens(two_ranks[1].id) == pytest.approx(tokens(reference.id), rel=1e-6)


# ---------------------------------------------------------------- kill -9, resume, cancel


def test_kill_9_of_rank_1_fails_the_run_then_resume_and_cancel_stop_both_ranks(db, tiny_chat_model):
    run = new_run(db, tiny_spec(tiny_chat_model, nproc_per_node=2, max_steps=400, save_steps=1,
                                batch_size=B, learning_rate=1e-3), project="kill")
    launch.start(db, run.id)
    wait_for(lambda: db.latest_checkpoint(run.id) is not None, 120, what="a first checkpoint")
    launcher = db.get_run(run.id).pid
    victim = rank_processes(launcher)[1]
    victim.send_signal(signal.SIGKILL)

    failed = wait_finished(db, run.id, timeout=60)
    assert failed.status == "failed", explain(db, failed)
    assert f"rank 1 (pid {victim.pid}) ended with exit code -9" in failed.error, failed.error
    assert liveness.run_processes(run.id) == []  # the launcher and rank 0 are gone too
    saved = db.latest_checkpoint(run.id).step

    resumed_at = time.time()
    launch.resume(db, run.id)
    first = wait_for(lambda: min([m.step for m in db.metrics_for(run.id, ["loss"]) if m.wall_time >= resumed_at],
                                 default=None), 120, what="the resumed run's first step")
    assert first == saved + 1, (first, saved)
    assert sorted(rank_processes(db.get_run(run.id).pid)) == [0, 1]  # resumed under torchrun again
    seen = db.last_step(run.id)
    launch.stop(db, run.id, "save")
    stopped = wait_finished(db, run.id, timeout=60)
    assert stopped.status == "cancelled", explain(db, stopped)
    last = max(metrics(db, run.id)["loss"])
    assert seen <= last <= seen + 3, (seen, last)
    assert db.latest_checkpoint(run.id).step == last
    assert launch._children[stopped.pid].wait(timeout=60) == 0  # the launcher, once both ranks exited 0
    assert liveness.run_processes(run.id) == []


# ---------------------------------------------------------------- the Train tab's setting


def test_the_processes_setting_reaches_the_draft_and_shows_only_with_several_gpus(monkeypatch):
    import gradio as gr

    from studio import sysinfo
    from studio.ui import train_tab
    from studio.ui.draft import RunDraft

    assert RunDraft().with_field("nproc_per_node", 2.0).spec.nproc_per_node == 2
    with pytest.raises(ValueError, match="whole number"):
        RunDraft().with_field("nproc_per_node", 1.5)
    shown = {}
    for gpus in (0, 1, 2):  # what the accelerator probe (a child process) would have said
        monkeypatch.setattr(sysinfo, "_cached", {"gpus": [{"name": "gpu", "free_bytes": 2**34}] * gpus})
        with gr.Blocks():
            widget = train_tab._option("nproc_per_node")
        shown[gpus] = widget.visible
        assert widget.label == "Processes (DDP)" and widget.value == 0
    assert shown == {0: False, 1: False, 2: True}


@pytest.mark.heavy  # a third torchrun run (two more starts): out of the default suite's budget
def test_kill_9_of_the_launcher_kills_its_ranks_and_sigterm_on_rank_1_stops_both(db, tiny_chat_model):
    """torchrun starts each rank in a session of its own: a launcher killed with SIGKILL leaves
    them training, so reconcile must end them before it marks the run failed. Then a SIGTERM
    to rank 1 alone stops both ranks at the same step, with a checkpoint, like Stop and save."""
    run = new_run(db, tiny_spec(tiny_chat_model, nproc_per_node=2, max_steps=400, save_steps=1,
                                batch_size=B, learning_rate=1e-3), project="launcher")
    launch.start(db, run.id)
    wait_for(lambda: (db.last_step(run.id) or 0) >= 2, 120, what="two steps")
    launcher = db.get_run(run.id).pid
    ranks = rank_processes(launcher)
    os.kill(launcher, signal.SIGKILL)
    failed = wait_finished(db, run.id, timeout=30)
    assert failed.status == "failed", explain(db, failed)
    assert f"pid {launcher}) ended with exit code -9" in failed.error, failed.error
    assert "outlived it and were killed" in failed.error, failed.error
    assert not [p for p in ranks.values() if liveness._lives(p)] and liveness.run_processes(run.id) == []

    saved = db.latest_checkpoint(run.id).step
    launch.resume(db, run.id)
    wait_for(lambda: (db.last_step(run.id) or 0) >= saved + 2, 120, what="two resumed steps")
    launcher = db.get_run(run.id).pid
    seen = db.last_step(run.id)
    rank_processes(launcher)[1].send_signal(signal.SIGTERM)
    assert launch._children[launcher].wait(timeout=60) == 0
    stopped = db.get_run(run.id)
    assert stopped.status == "cancelled" and "Stopped by SIGTERM" in stopped.error, explain(db, stopped)
    last = max(metrics(db, run.id)["loss"])
    assert seen <= last <= seen + 3 and db.latest_checkpoint(run.id).step == last, (seen, last)
    assert liveness.run_processes(run.id) == []
