"""``peft-studio train runspec.json``: the headless door to the same worker the UI uses.

The CLI starts a real worker process; the run it must reproduce is trained in this process with
the worker's own ``train`` (the same code, without a second ~7 s process start-up).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest

from studio.db import Database
from studio.runs import launch
from worker_helpers import explain, metrics, reap_workers, tiny_spec, train_here  # noqa: F401


def cli_train(path, *extra: str, timeout: float = 180) -> subprocess.CompletedProcess:
    # The test's PEFT_STUDIO_HOME (set by the studio_home fixture) is in os.environ.
    return subprocess.run([sys.executable, "-m", "studio", "train", str(path), *extra],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ})


def test_cli_train_reproduces_a_run_from_its_saved_runspec(tiny_chat_model, tmp_path):
    db = Database()
    spec = tiny_spec(tiny_chat_model, max_steps=3, save_steps=3, learning_rate=1e-2)
    reference = train_here(db, spec)
    assert reference.status == "completed", explain(db, reference)

    # The run's own runspec.json, as the Train tab saves it, is what the CLI takes.
    path = tmp_path / "runspec.json"
    path.write_text((launch.run_folder(db, reference) / "runspec.json").read_text())
    try:
        done = cli_train(path, "--project", "cli")
    finally:  # a CLI that timed out must not leave its worker (our grandchild) training
        for run in db.runs_with_status("running"):
            if run.pid and psutil.pid_exists(run.pid):
                os.killpg(run.pid, signal.SIGKILL)
    assert done.returncode == 0, done.stdout + done.stderr

    project = db.get_project_by_name("cli")
    [cli_run] = db.list_runs(project.id)
    assert cli_run.status == "completed", explain(db, cli_run)
    assert cli_run.spec == reference.spec
    assert f"run {cli_run.id} started in project 'cli'" in done.stdout
    assert "{'loss'" in done.stdout  # the worker's log, streamed
    assert f"run {cli_run.id}: completed" in done.stdout

    ref_loss, cli_loss = metrics(db, reference.id)["loss"], metrics(db, cli_run.id)["loss"]
    assert sorted(cli_loss) == [1, 2, 3]
    assert cli_loss[1] == pytest.approx(ref_loss[1], abs=1e-6)
    for step in (2, 3):  # same seed: the LoRA init, dropout and data order repeat too
        assert cli_loss[step] == pytest.approx(ref_loss[step], abs=1e-5), (step, ref_loss, cli_loss)


@pytest.mark.parametrize("change,field", [
    ({"no_such_option": 1}, "no_such_option"),
    ({"learning_rate": 5}, "learning_rate"),
    ({"batch_size": "four"}, "batch_size"),
    ({"packing": "yes"}, "packing"),
    ({"max_steps": None}, "max_steps"),
    ({"lr_scheduler": "sawtooth"}, "lr_scheduler"),
    ({"method": "nope"}, "nope"),
    ({"method_settings": {"r": 0}}, "'r'"),
])
def test_cli_train_rejects_a_bad_runspec_naming_the_field(tiny_chat_model, tmp_path, change, field):
    spec = tiny_spec(tiny_chat_model).to_dict()
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**spec, **change}))
    done = cli_train(path, "--project", "cli", timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert field in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert Database().list_runs() == []  # nothing was created or started


def test_cli_train_rejects_an_unreadable_runspec(tmp_path):
    missing = tmp_path / "missing.json"
    done = cli_train(missing, timeout=60)
    assert done.returncode == 2 and "cannot read runspec" in done.stderr, done.stderr
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    done = cli_train(broken, timeout=60)
    assert done.returncode == 2 and "cannot read runspec" in done.stderr, done.stderr
