"""Worker bookkeeping under faults (issue 12, items 5, 6, 9 and 11), with real SQLite files, real
links and real worker processes: one bad run row must not stop reconcile (the UI's start-up and
every poll, every `peft-studio train`), a start or resume of such a row is refused without
claiming the device, polls survive a history that cannot be written, finished workers are
reaped, and a run naming a dataset that is not there leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import psutil
import pytest

import studio.db.engine as db_engine
from fault_helpers import hold_write_lock, make_read_only, release
from studio import projects
from studio.db import Database, RunStatus, utcnow
from studio.runspec import RunSpec, RunSpecError
from studio.runs import launch
from worker_helpers import reap_workers, wait_for  # noqa: F401  (the fixture kills leftovers)

SPEC = dict(method="lora", sample_task="dates", max_steps=2, batch_size=2, max_length=64,
            eval_steps=0, save_steps=0, exact_match_limit=0, warmup_ratio=0.0)
BAD_FOLDERS = ["link out of runs", "../../etc", "/etc", ""]


def _spec(**overrides) -> RunSpec:
    # A model that does not exist: a worker started for it fails on its own within seconds.
    return RunSpec(model="/nonexistent/model", **{**SPEC, **overrides})


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _waitable(pid: int) -> bool:
    """Whether our child ``pid`` has exited, without reaping it (WNOWAIT): a zombie until its
    parent collects it. (psutil shows the leader as a zombie while exit is still unwinding
    other threads, when waitpid cannot collect it yet.)"""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _project(db: Database, name: str = "faults"):
    return db.get_project_by_name(name) or projects.create_project(db, name)


def _break_folder(db: Database, run, kind: str, outside: Path) -> None:
    """Turn the run's folder into a link out of runs/, or tamper with the recorded value."""
    if kind == "link out of runs":
        folder = launch.run_folder(db, run)
        for item in folder.iterdir():
            item.unlink()
        folder.rmdir()
        outside.mkdir(exist_ok=True)
        (outside / launch.LOG_NAME).write_text("SECRET line that must not be read\n")
        folder.symlink_to(outside, target_is_directory=True)
    else:
        db.update_run(run.id, folder=kind)


def _running_dead(db: Database, run_id: int) -> None:
    """The row a worker killed while the UI was closed leaves: running, under a gone pid."""
    db.update_run(run_id, status=RunStatus.RUNNING.value, pid=_dead_pid(), heartbeat_at=utcnow())


@pytest.mark.parametrize("kind", BAD_FOLDERS)
def test_reconcile_isolates_a_bad_run_folder(db: Database, tmp_path: Path, kind: str) -> None:
    """Item 6: a dead run whose folder left runs/ made reconcile raise, so `peft-studio ui` and
    every `peft-studio train` exited at start-up. Now that row is failed with a message naming
    its folder, its log is not read through the link, and the other rows are reconciled."""
    pid = _project(db).id
    bad = launch.create_run(db, pid, _spec(), "bad")
    good = launch.create_run(db, pid, _spec(), "good")
    (launch.run_folder(db, good) / launch.LOG_NAME).write_text("the good run's last words\n")
    _break_folder(db, bad, kind, tmp_path / "outside")
    _running_dead(db, bad.id)
    _running_dead(db, good.id)
    recorded = db.get_run(bad.id).folder

    fresh = Database()  # what the UI and the CLI do at start-up
    try:
        assert sorted(launch.reconcile(fresh)) == sorted([bad.id, good.id])
    finally:
        fresh.close()
    bad_row, good_row = db.get_run(bad.id), db.get_run(good.id)
    assert bad_row.status == good_row.status == RunStatus.FAILED.value
    assert repr(recorded) in bad_row.error and "not a folder inside" in bad_row.error
    assert "SECRET" not in bad_row.error
    if kind == "link out of runs":
        assert "link to" in bad_row.error
    assert "the good run's last words" in good_row.error


@pytest.mark.parametrize("action", ["start", "resume"])
def test_start_and_resume_refuse_a_bad_folder(db: Database, tmp_path: Path, action: str) -> None:
    """Item 6: start/resume claimed the device first and then failed on the folder, leaving the
    run "running" under the caller's own pid (so every later start was refused, forever)."""
    run = launch.create_run(db, _project(db).id, _spec())
    _break_folder(db, run, "link out of runs", tmp_path / "outside")
    if action == "resume":
        db.update_run(run.id, status=RunStatus.FAILED.value, error="killed")
    before = db.get_run(run.id)
    children = set(launch._children)
    with pytest.raises(launch.RunFolderError, match="not a folder inside") as refused:
        (launch.start if action == "start" else launch.resume)(db, run.id)
    assert isinstance(refused.value, launch.RunConflict)  # shown by every caller of start
    after = db.get_run(run.id)
    assert (after.status, after.pid) == (before.status, before.pid)
    assert not db.runs_with_status(RunStatus.RUNNING.value)
    assert set(launch._children) == children  # nothing was started
    assert not (tmp_path / "outside" / "runspec.json").exists()


def test_dispatch_skips_a_bad_run_and_reaps_finished_workers(db: Database, tmp_path: Path) -> None:
    """Items 6 and 9 with one real worker. The queue's first run has a folder out of runs/:
    dispatch used to claim it and raise (the run stuck "running", the queue stopped). It must be
    failed and the next run started. That worker ends on its own (it writes its own status, so
    reconcile never looked at it again) and stayed a zombie child of the UI; a poll reaps it."""
    pid = _project(db).id
    bad = launch.create_run(db, pid, _spec(), "bad")
    good = launch.create_run(db, pid, _spec(), "good")
    _break_folder(db, bad, "link out of runs", tmp_path / "outside")

    started = launch.enqueue(db, [bad.id, good.id])
    assert started is not None and started.id == good.id
    assert db.get_run(bad.id).status == RunStatus.FAILED.value
    assert "not a folder inside" in db.get_run(bad.id).error
    worker = started.pid
    assert worker in {child.pid for child in psutil.Process().children()}

    # The worker records its own end (the model does not exist); no poll runs meanwhile.
    wait_for(lambda: db.get_run(good.id).status != RunStatus.RUNNING.value, 120, 0.2,
             "the worker to record its own failure")
    wait_for(lambda: _waitable(worker), 60, 0.1, "the worker process to exit")
    launch.reconcile(db)  # the UI's poll
    with pytest.raises(ChildProcessError):  # reaped: no longer a child of ours at all
        _waitable(worker)
    zombies = [c.pid for c in psutil.Process().children() if c.status() == psutil.STATUS_ZOMBIE]
    assert worker not in zombies and worker not in launch._children
    assert db.get_run(good.id).status == RunStatus.FAILED.value  # its own status, kept
    assert "/nonexistent/model" in (db.get_run(good.id).error or "") + launch.log_tail(db, good)


@pytest.mark.parametrize("fault", ["locked", "read-only"])
def test_polls_survive_a_history_that_cannot_be_written(studio_home: Path, monkeypatch,
                                                        fault: str) -> None:
    """Item 5, the poll side: reconcile, dispatch and active_run run every second in the UI and
    the CLI; a history that cannot be written (another process holds the lock; the file turned
    read-only) made each poll raise. They must answer, and catch up once it can be written."""
    monkeypatch.setattr(db_engine, "SQLITE_BUSY_MS", 200)  # connections made from here on
    db = Database()
    try:
        pid = _project(db).id
        dead = launch.create_run(db, pid, _spec(), "dead")
        waiting = launch.create_run(db, pid, _spec(), "waiting")
        _running_dead(db, dead.id)
        db.enqueue_runs([waiting.id])
        if fault == "locked":
            holder = hold_write_lock(db.path)
            undo = lambda: release(holder)  # noqa: E731
        else:
            undo = make_read_only(db.path)
            db.engine.dispose()  # reconnect: the file now opens read-only
        try:
            assert launch.reconcile(db) == []
            assert launch.dispatch(db) is None
            assert launch.active_run(db).id == dead.id  # reads still answer
        finally:
            undo()
        db.engine.dispose()
        assert launch.reconcile(db) == [dead.id]  # caught up once writable
        assert db.get_run(dead.id).status == RunStatus.FAILED.value
    finally:
        from queue_helpers import stop_everything

        stop_everything(db)
        db.close()


@pytest.mark.parametrize("dataset_id", [10**20, -1, 0, 99, "other project"])
def test_create_run_refuses_a_dataset_that_is_not_there(db: Database, dataset_id) -> None:
    """Item 11, existence: dataset_id 1e20 / -1 / 0 / missing gave tracebacks (or a row and a
    folder left behind); another project's dataset was accepted. Refused by field, nothing made."""
    project = _project(db)
    other = _project(db, "other")
    foreign = db.add_dataset(other.id, name="theirs")
    value = foreign.id if dataset_id == "other project" else dataset_id
    spec = RunSpec(model="/nonexistent/model", **{**SPEC, "sample_task": None, "dataset_id": value})
    with pytest.raises(RunSpecError, match="dataset_id"):
        launch.create_run(db, project.id, spec)
    assert db.list_runs() == []
    runs = projects.project_dir(project) / "runs"
    assert not runs.exists() or not any(runs.iterdir())


def test_the_app_starts_beside_a_bad_run_row(db: Database, tmp_path: Path) -> None:
    """Item 6, end to end: `peft-studio ui` reconciles at start-up; a dead run whose folder is a
    link out of runs/ made it exit before serving a page. It must serve, with the run failed."""
    from conftest import start_app, stop_app

    run = launch.create_run(db, _project(db).id, _spec(), "bad")
    _break_folder(db, run, "link out of runs", tmp_path / "outside")
    _running_dead(db, run.id)
    proc, _url, log = start_app(tmp_path / "app.log")  # raises if the app exits instead
    stop_app(proc, log)
    assert db.get_run(run.id).status == RunStatus.FAILED.value
    assert "not a folder inside" in db.get_run(run.id).error
