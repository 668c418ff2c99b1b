"""``peft-studio`` errors (issue 12, item 12): a refused ``train`` leaves nothing behind, the
project get-or-create race, a locked history and Ctrl-C: one line, exit code 2 (130 for Ctrl-C).

Refusals run ``cli.main`` in this process against the test's real SQLite home (each is a few
milliseconds; a subprocess would cost a second of imports for the same code path); the
concurrency, the locked database and Ctrl-C need real processes and real signals, so they run
``python -m studio`` as the user does.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from studio import cli, config, projects
from studio.db import Database
from studio.runspec import RunSpec
from worker_helpers import tiny_spec, wait_finished


def spec_file(tmp_path, **overrides) -> str:
    # Never trained by the refusal tests: the model only has to look like a model folder.
    base = dict(model="default", method="lora", sample_task="dates", max_steps=2, batch_size=2,
                max_length=64, eval_steps=0, save_steps=0, exact_match_limit=0)
    path = tmp_path / "runspec.json"
    path.write_text(json.dumps({**RunSpec(**base).to_dict(), **overrides}))
    return str(path)


def run_folders() -> list[str]:
    return sorted(str(p.relative_to(config.projects_dir()))
                  for p in config.projects_dir().glob("*/runs/*"))


def busy_run(db: Database, pid: int) -> int:
    """A run "training" under ``pid``: claimed through the same atomic claim a start uses."""
    project = projects.create_project(db, "busy")
    run = db.create_run(project.id, "the other training", "lora", {})
    claimed, _ = db.claim_run(run.id, pid)
    assert claimed is not None
    return run.id


def refuse_conflict(db, tmp_path, sleeper):
    return busy_run(db, sleeper.pid), spec_file(tmp_path), "is training on this machine"


def refuse_dataset(db, tmp_path, sleeper):
    return None, spec_file(tmp_path, sample_task=None, dataset_id=7), "no dataset 7"


def refuse_foreign_dataset(db, tmp_path, sleeper):
    other = projects.create_project(db, "other")  # the dataset exists, in another project
    dataset = db.add_dataset(other.id, name="theirs")
    return None, spec_file(tmp_path, sample_task=None, dataset_id=dataset.id), f"no dataset {dataset.id}"


def refuse_model(db, tmp_path, sleeper):
    return None, spec_file(tmp_path, model=str(tmp_path / "no-such-model")), "runspec 'model'"


def refuse_sample_task(db, tmp_path, sleeper):
    return None, spec_file(tmp_path, sample_task="no_such_task"), "sample_task"


def refuse_runspec(db, tmp_path, sleeper):
    return None, spec_file(tmp_path, learning_rate=5), "learning_rate"


@pytest.mark.parametrize("make", [refuse_conflict, refuse_dataset, refuse_foreign_dataset, refuse_model,
                                  refuse_sample_task, refuse_runspec])
def test_a_refused_train_leaves_no_run_no_folder_no_project(db, tmp_path, sleeper, capsys, make):
    busy, path, reason = make(db, tmp_path, sleeper)
    before = run_folders()
    code = cli.main(["train", path, "--project", "new project"])
    err = capsys.readouterr().err
    assert code == 2 and reason in err, err
    assert err.count("\n") == 1 and err.startswith("peft-studio train: ") and "Traceback" not in err, err
    assert [r.id for r in db.list_runs()] == ([busy] if busy else [])
    assert run_folders() == before
    assert db.get_project_by_name("new project") is None


def test_a_bad_project_name_is_refused_before_anything_is_written(db, tmp_path, capsys):
    code = cli.main(["train", spec_file(tmp_path), "--project", "x" * 500])
    err = capsys.readouterr().err
    assert code == 2 and "--project" in err and "at most" in err and "Traceback" not in err, err
    assert db.list_projects() == [] and db.list_runs() == []


def test_a_runs_folder_that_cannot_be_made_is_refused_before_the_run_row(db, tmp_path, capsys):
    project = projects.create_project(db, "blocked")
    blocker = projects.project_dir(project) / "runs"
    blocker.write_text("a file where the runs folder goes")
    code = cli.main(["train", spec_file(tmp_path), "--project", "blocked"])
    err = capsys.readouterr().err
    assert code == 2 and "runs folder" in err and "Traceback" not in err, err
    assert db.list_runs() == [] and blocker.read_text() == "a file where the runs folder goes"


def test_a_file_where_the_run_folder_goes_is_refused_and_kept(db, tmp_path, capsys):
    """``create_run`` fails after making the row (its folder name is taken by a file): the row
    goes, the file stays as it was (not renamed, not deleted)."""
    project = projects.create_project(db, "taken")
    runs = projects.project_dir(project) / "runs"
    runs.mkdir()
    squatter = runs / "run-0001-lora-on-dates"  # the folder the first run of this spec gets
    squatter.write_text("someone else's file")
    code = cli.main(["train", spec_file(tmp_path), "--project", "taken"])
    err = capsys.readouterr().err
    assert code == 2 and "run's folder" in err and str(squatter) in err and "Traceback" not in err, err
    assert db.list_runs() == [] and os.listdir(runs) == [squatter.name]
    assert squatter.read_text() == "someone else's file"


def test_a_conflict_after_the_check_deletes_the_run_it_made(db, tmp_path, sleeper, capsys, monkeypatch):
    """The race: another train claims the device between our check and our start (here: just
    after our row and folder were made). The claim is atomic, so ours is refused; the row and
    folder we made are deleted again (no orphan queued run)."""
    from studio.runs import launch

    real_create = launch.create_run
    taken = []

    def create_then_lose_the_race(database, *args, **kwargs):
        run = real_create(database, *args, **kwargs)  # the device was free at the check...
        taken.append(busy_run(database, sleeper.pid))  # ...and is taken before our start
        return run

    monkeypatch.setattr(launch, "create_run", create_then_lose_the_race)
    code = cli.main(["train", spec_file(tmp_path), "--project", "racer"])
    err = capsys.readouterr().err
    assert code == 2 and "is training on this machine" in err and "Traceback" not in err, err
    assert taken, "the race was not staged: the start never reached create_run"
    assert [r.id for r in db.list_runs()] == taken
    assert run_folders() == []


def _get_or_create(home, barrier, results):
    os.environ["PEFT_STUDIO_HOME"] = home
    database = Database()
    barrier.wait()
    try:
        results.put(projects.get_or_create_project(database, "Shared new project").id)
    except Exception as exc:  # the race this test is about: reported, not raised in a child
        results.put(f"{type(exc).__name__}: {exc}")


def test_many_processes_asking_for_one_new_project_all_get_it(db, studio_home):
    """Eight real processes, released together, get-or-create the same new project: every one
    gets the same row (the old read-then-create raised "already exists" in the losers)."""
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(8), context.Queue()
    procs = [context.Process(target=_get_or_create, args=(str(studio_home), barrier, results))
             for _ in range(8)]
    for proc in procs:
        proc.start()
    got = [results.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    [project] = db.list_projects()
    assert got == [project.id] * 8, got
    assert projects.project_dir(project).is_dir()


def studio(*argv: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "studio", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ}, **kw)


def test_two_trains_at_once_on_a_new_project_then_ctrl_c_then_stop(db, tiny_chat_model, tmp_path):
    """Two ``peft-studio train --project NEW`` started together: both get the project, one
    trains, the other is refused and leaves nothing. Ctrl-C (a real SIGINT) on the one that
    trains stops following, not training, and says how to stop it; that advice works."""
    path = tmp_path / "spec.json"
    # Far more steps than can run before the stop below lands: the run must end "cancelled".
    path.write_text(json.dumps(tiny_spec(tiny_chat_model, max_steps=20_000, save_steps=0).to_dict()))
    # Ctrl-C as in a terminal: a suite started in the background (`cmd &`, nohup) hands its
    # children SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
    both = [studio("train", str(path), "--project", "Brand new",
                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) for _ in range(2)]
    try:
        deadline = time.monotonic() + 90
        while all(p.poll() is None for p in both) and time.monotonic() < deadline:
            time.sleep(0.1)
        [loser] = [p for p in both if p.poll() is not None]
        [winner] = [p for p in both if p is not loser]
        err = loser.stderr.read()
        assert loser.returncode == 2 and "is training on this machine" in err, err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        first = winner.stdout.readline()
        assert "started in project 'Brand new'" in first, first
        # Keep reading what it follows: a full stdout pipe (the worker's log, on a fast machine)
        # would block its exit flush after the Ctrl-C, and the wait below time out (seen in CI).
        threading.Thread(target=winner.stdout.read, daemon=True).start()
        [project] = db.list_projects()
        [run] = db.list_runs()
        assert run.project_id == project.id and len(run_folders()) == 1

        winner.send_signal(signal.SIGINT)
        assert winner.wait(timeout=30) == 130
        err = winner.stderr.read()
        assert f"peft-studio stop {run.id}" in err and "keeps training" in err and "Traceback" not in err, err
        worker = db.get_run(run.id)
        assert worker.status == "running" and psutil.pid_exists(worker.pid)
    finally:
        for proc in both:
            if proc.poll() is None:
                proc.kill()
    stopped = subprocess.run([sys.executable, "-m", "studio", "stop", str(run.id)], capture_output=True,
                             text=True, env={**os.environ}, timeout=60)
    assert stopped.returncode == 0 and "asked to stop" in stopped.stdout, stopped.stderr
    assert wait_finished(db, run.id, timeout=120).status == "cancelled", launch_log(db, run)


def launch_log(db, run) -> str:
    from studio.runs import launch

    return launch.log_tail(db, db.get_run(run.id))


def test_a_locked_history_is_one_line_and_exit_2(db, tmp_path):
    """Another process holds the write lock (BEGIN IMMEDIATE) past the 10 s busy timeout."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "c.execute('BEGIN IMMEDIATE'); print('held', flush=True); time.sleep(60)"), str(db.path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        done = subprocess.run([sys.executable, "-m", "studio", "train", spec_file(tmp_path), "--project", "p"],
                              capture_output=True, text=True, env={**os.environ}, timeout=90)
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("peft-studio train: "), done.stderr
    assert "locked" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert db.list_projects() == [] and db.list_runs() == []


def test_stop_refuses_a_run_that_is_not_training_in_one_line(db, capsys):
    project = projects.create_project(db, "p")
    done = db.create_run(project.id, "finished", "lora", {}, status="completed")
    for run_id, why in ((done.id, "is completed"), (99, "no run 99")):
        code = cli.main(["stop", str(run_id)])
        err = capsys.readouterr().err
        assert code == 2 and why in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert db.get_run(done.id).cancel_request is None  # nothing was asked of a finished run
