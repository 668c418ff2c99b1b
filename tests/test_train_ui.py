"""The Train tab's handlers without a browser: a real database, real workers, the tiny model.

The handlers are the functions the tab's events call (``train_actions.start_run`` with the
session's run draft, ``render_run``, ``stop_run``, ``resume_run``) and, for the UI-restart case,
the poll handler of a freshly built app, found among its registered event functions.
"""

from __future__ import annotations

import math
import threading
import time

import pandas as pd
import pytest

from studio import projects
from studio.db import Database, RunStatus
from studio.run_setup import DeviceFacts
from studio.runs import launch
from studio.ui import estimates, train_actions, train_view
from studio.ui.draft import RunDraft

FAST = {"max_steps": 6, "eval_steps": 3, "exact_match_limit": 5}


def draft_of(data: str = "sample:dates", method: str = "lora", settings: dict | None = None,
             **fields) -> RunDraft:
    """The draft a session holds after choosing ``data``, ``method``, its settings and ``fields``."""
    draft = RunDraft().with_data(data).with_method(method)
    for name, value in (settings or {}).items():
        draft = draft.with_setting(name, value)
    for name, value in fields.items():
        draft = draft.with_field(name, value)
    return draft


def start(db, project_id, *args, device=None, **fields):
    return train_actions.start_run(db, project_id, draft_of(*args, **fields), device=device)


@pytest.fixture
def project(tiny_chat_model):
    db = Database()
    project = projects.create_project(db, "Tiny", model_source=str(tiny_chat_model))
    yield db, project
    # Never leave a worker behind: ask running ones to stop, then kill what is left.
    import psutil

    for run in db.runs_with_status(RunStatus.RUNNING.value):
        launch.stop(db, run.id, "discard")
    deadline = time.monotonic() + 60
    while db.runs_with_status(RunStatus.RUNNING.value) and time.monotonic() < deadline:
        launch.reconcile(db)
        time.sleep(0.5)
    for run in db.runs_with_status(RunStatus.RUNNING.value):
        try:
            psutil.Process(run.pid).kill()
        except psutil.Error:
            pass


def wait_for(predicate, timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        launch.reconcile(Database())
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def steps_of(frame: pd.DataFrame, series: str) -> list[int]:
    """Steps with a value (a series without points yet is one NaN row that is not drawn)."""
    return [int(s) for s in frame[(frame["series"] == series) & frame["value"].notna()]["step"]]


def logged_steps(db: Database, run_id: int, name: str) -> list[int]:
    return [m.step for m in db.metrics_for(run_id, names=[name])]


def finished(db: Database, run_id: int):
    view = train_view.render_run(db, run_id)
    return view if view.run.status != RunStatus.RUNNING.value else None


def test_start_trains_a_sample_task_and_renders_curves_and_summary(project):
    db, proj = project
    message, run_id = start(db, proj.id, **FAST)
    assert run_id is not None, message
    assert "Started run" in message
    view = wait_for(lambda: finished(db, run_id), 300, "the run to end")
    assert view.run.status == RunStatus.COMPLETED.value, view.run.error

    # The plots hold exactly what the worker logged, as floats (a plot keeps its first axis types).
    assert steps_of(view.loss, "train loss") == logged_steps(db, run_id, "loss") == list(range(1, 7))
    assert steps_of(view.loss, "eval loss") == sorted(set(logged_steps(db, run_id, "eval_loss")))
    assert steps_of(view.lr, "learning rate") == logged_steps(db, run_id, "learning_rate")
    assert steps_of(view.speed, "tokens/s") == logged_steps(db, run_id, "tokens_per_s")
    for frame in (view.loss, view.lr, view.speed):
        assert frame["step"].dtype == float and frame["value"].dtype == float

    assert "Step 6 / 6" in view.progress
    assert "completed" in view.summary and "eval exact match" in view.summary
    exact = db.metrics_for(run_id, names=["eval_exact_match"])[-1].value
    assert f"{exact:.1%}" in view.summary
    assert "final train loss" in view.summary and "duration" in view.summary
    assert "completed" in view.log  # the worker's last line


def test_frames_hold_every_series_from_the_first_one_with_float_types():
    # Gradio's plot fixes its colour domain and axis types on the first frame it draws.
    empty = train_view.frame({}, train_view.LOSS_SERIES)
    assert list(empty["series"]) == ["train loss", "eval loss"] and empty["value"].isna().all()
    assert empty["step"].dtype == float and empty["value"].dtype == float
    partial = train_view.frame({"loss": [(1, 2.5), (2, 2.0), (3, float("inf"))]}, train_view.LOSS_SERIES)
    assert list(partial["series"]) == ["train loss"] * 3 + ["eval loss"]
    assert list(partial["value"].iloc[:2]) == [2.5, 2.0] and partial["value"].iloc[2:].isna().all()


def test_a_series_with_one_point_is_drawn_as_a_flat_dash():
    """Issue 15 item 5: one evaluation drew nothing (a line needs two points). It becomes a dash
    at its value, ±1 % of the step range around its step; a NaN never counts as the point."""
    f = train_view.frame({"loss": [(s, 1.0 / s) for s in range(1, 61)], "eval_loss": [(20, 0.9), (40, math.nan)]},
                         train_view.LOSS_SERIES)
    dash = f[f["series"] == "eval loss"].dropna().sort_values("step")
    assert list(dash["step"]) == [19.4, 20.0, 20.6] and set(dash["value"]) == {0.9}
    assert (f["series"] == "train loss").sum() == 60  # two or more points: drawn as they are
    assert train_view.render_run(Database(), None).run is None


def test_eta_and_log_cleaning_helpers(project):
    assert train_view.seconds_per_step([(1, 9.0), (2, 11.0), (3, 13.0)]) == 2.0
    assert train_view.seconds_per_step([(1, 9.0)]) is None  # one point: the warm-up would mislead
    assert train_view.seconds_per_step([(4, 30.0), (5, 1.0), (6, 3.5)]) == 2.5  # after a resume
    assert train_view.seconds_per_step([(1, 0.0), (2, 2.0), (3, 92.0), (4, 94.0)]) == 2.0  # an eval
    for step, eta, text in [(0, None, "starting…"), (5, 90.0, "ETA 1 min 30 s"), (60, 0.0, "final evaluation…")]:
        assert text in train_view.progress_html(step, 60, eta, "running")
    assert "cancelled" in train_view.progress_html(6, 60, None, "cancelled")
    assert train_view.duration(75) == "1 min 15 s" and train_view.duration(3720) == "1 h 2 min"
    # Y limits change only when the data leaves them (each change redraws the plot's axes).
    assert train_view.nice_limits(pd.Series([10.77, 10.83])) == [10.76, 10.84]
    assert train_view.nice_limits(pd.Series([0.48, 0.56])) == [0.47, 0.57]
    assert train_view.nice_limits(pd.Series([0.0, 2e-4, float("nan")])) == [0.0, 0.0003]
    assert train_view.nice_limits(pd.Series([float("nan")])) is None
    db, proj = project
    run = launch.create_run(db, proj.id, draft_of().run_spec("default"))
    (launch.run_folder(db, run) / launch.LOG_NAME).write_text("load 10%\rload 50%\rload 100%\nstep 1\n\n")
    assert train_view.clean_log(db, run) == "load 100%\nstep 1"


def test_second_start_is_refused_then_stop_save_and_resume(project):
    db, proj = project
    results: list[tuple[str, int | None]] = []

    def click():
        results.append(start(db, proj.id, "sample:sentiment", **{**FAST, "max_steps": 400}))

    threads = [threading.Thread(target=click) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    started = [r for r in results if r[1] is not None]
    refused = [r for r in results if r[1] is None]
    assert len(started) == 1 and len(refused) == 1, results
    run_id = started[0][1]
    assert "Not started" in refused[0][0] and f"run {run_id} " in refused[0][0]
    assert "is training on this machine" in refused[0][0]
    assert [r.id for r in db.list_runs(proj.id)] == [run_id]  # the refused click created nothing

    wait_for(lambda: len(logged_steps(db, run_id, "loss")) >= 2, 120, "two training steps")
    assert "Stopping run" in train_actions.stop_run(db, run_id, "save")
    view = wait_for(lambda: finished(db, run_id), 120, "the stop")
    assert view.run.status == RunStatus.CANCELLED.value
    assert "cancelled" in view.summary
    stopped_at = logged_steps(db, run_id, "loss")[-1]
    assert db.latest_checkpoint(run_id) is not None  # "save" kept one
    assert "Nothing to stop" in train_actions.stop_run(db, run_id, "save")

    # Resume continues from the checkpoint; then stop it for good, discarding checkpoints.
    assert "Resumed run" in train_actions.resume_run(db, run_id)
    wait_for(lambda: logged_steps(db, run_id, "loss")[-1] > stopped_at, 120, "a step after the resume")
    train_actions.stop_run(db, run_id, "discard")
    view = wait_for(lambda: finished(db, run_id), 120, "the second stop")
    assert view.run.status == RunStatus.CANCELLED.value
    assert db.latest_checkpoint(run_id) is None


def test_ui_restart_during_a_run_shows_it_running_with_all_metrics(project):
    from studio.ui.app import build_app

    db, proj = project
    _, run_id = start(db, proj.id, **{**FAST, "max_steps": 400})
    assert run_id is not None
    wait_for(lambda: len(logged_steps(db, run_id, "loss")) >= 3, 120, "three training steps")

    # A new app (a fresh Database, as after a restart) and its timer's poll handler, page-load state.
    demo = build_app(Database())
    poll = next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "poll")
    outputs = poll(proj.id, None, {"key": None, "choices": None})
    run_update, status, progress, loss, lr, speed, log, summary, state, message, stopping, timer = outputs
    assert timer["value"] == 1.0  # a real worker is training: the poll stays fast (idle: test_idle_polling)
    assert loss["x_lim"] == [0.0, 400.0] and loss["y_lim"][0] <= loss["value"]["value"].min()
    loss, lr, speed = loss["value"], lr["value"], speed["value"]  # gr.update(value=frame, limits)
    assert run_update["value"] == run_id  # the newest run is selected on its own
    assert any(choice[1] == run_id and "running" in choice[0] for choice in run_update["choices"])
    assert "running" in status and f"#{run_id}" in status
    assert "Step " in progress and summary == "" and message == stopping == {"__type__": "update"}
    shown = steps_of(loss, "train loss")
    logged = logged_steps(db, run_id, "loss")
    assert len(shown) >= 3 and shown == logged[:len(shown)] and shown[0] == 1  # the whole curve
    assert steps_of(lr, "learning rate")[0] == 1 and steps_of(speed, "tokens/s")[0] == 1

    # New steps arrive on a later poll of the same page.
    wait_for(lambda: len(logged_steps(db, run_id, "loss")) > len(shown), 60, "another step")
    later = poll(proj.id, run_id, state)
    assert later[-4]["key"] != state["key"]  # the state the next poll is given
    assert len(steps_of(later[3]["value"], "train loss")) > len(shown)

    # Once nothing changes, a poll re-sends nothing: the plots are not redrawn every second.
    train_actions.stop_run(db, run_id, "discard")
    wait_for(lambda: finished(db, run_id), 120, "the stop")
    settled = poll(proj.id, run_id, poll(proj.id, run_id, later[-4])[-4])
    *updates, _state, message, stopping, _timer = settled
    assert all(update == {"__type__": "update"} for update in [*updates, message, stopping])
    # A stop the page asked for: once the run has ended, the message says what happened, once.
    done = poll(proj.id, run_id, later[-4], [run_id, "discard"])
    assert f"Run #{run_id} stopped" in done[-3] and "discarded" in done[-3] and done[-2] is None
    demo.close()


def test_start_is_refused_when_the_estimate_exceeds_the_gpu_or_a_setting_is_wrong(project):
    db, proj = project
    tiny_gpu = DeviceFacts("cuda", 2**20, True, None)  # a GPU with 1 MiB free
    message, run_id = start(db, proj.id, device=tiny_gpu, **FAST)
    assert run_id is None and "would not fit" in message
    cpu = DeviceFacts("cpu", None, False, False)
    message, run_id = start(db, proj.id, device=cpu, learning_rate=5)
    assert run_id is None and "learning_rate" in message
    message, run_id = start(db, proj.id, "sample:dates", "lora", {"r": 0}, device=cpu, **FAST)
    assert run_id is None and "Not started" in message
    assert db.list_runs(proj.id) == []
    text = estimates.train_estimate(draft_of(), proj.model_source, cpu)
    assert "Estimated training memory" in text and "fp32" in text and "No GPU found" in text
    assert "exceeds" in estimates.train_estimate(draft_of(), proj.model_source, tiny_gpu)


def test_a_failed_run_shows_its_error(tmp_path):
    db = Database()
    missing = projects.create_project(db, "Missing", model_source=str(tmp_path / "no-such-model"))
    message, run_id = start(db, missing.id, **FAST)  # refused before a run exists
    assert run_id is None and "no-such-model" in message and db.list_runs(missing.id) == []
    folder = tmp_path / "broken-model"  # a model folder the worker cannot load
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "no-such-architecture"}')
    broken = projects.create_project(db, "Broken", model_source=str(folder))
    message, run_id = start(db, broken.id, **FAST)
    assert run_id is not None, message
    view = wait_for(lambda: finished(db, run_id), 120, "the worker to fail")
    assert view.run.status == RunStatus.FAILED.value
    assert "What went wrong" in view.summary and view.run.error.strip()[-40:] in view.summary
    assert "failed" in train_actions.run_choices(db, broken.id)[0][0]
    assert "Nothing to stop" in train_actions.stop_run(db, run_id, "save")


def test_the_panel_follows_a_run_that_appears_even_when_a_poll_carries_the_old_selection(project):
    """Issue 15 item 3: after Start, a poll that began before Start's answer still carries the old
    selection; the panel must move to the new run, not write the old one back."""
    from studio.runspec import RunSpec
    from studio.ui.app import build_app

    db, proj = project
    spec = RunSpec(model=proj.model_source, sample_task="dates", max_steps=2)
    old = launch.create_run(db, proj.id, spec, name="old")
    db.update_run(old.id, status=RunStatus.COMPLETED.value)
    demo = build_app(Database())
    poll = next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "poll")
    first = poll(proj.id, None, {"key": None, "choices": None})
    assert first[0]["value"] == old.id
    new = launch.create_run(db, proj.id, spec, name="new")  # as Start (or the CLI) makes it
    follow = poll(proj.id, old.id, first[-4])  # the page still has the old run selected
    assert follow[0]["value"] == new.id and f"#{new.id}" in follow[1]
    # Once the new run is listed, the user's own choice of an older run is kept (nothing re-sent).
    assert poll(proj.id, old.id, follow[-4])[0] == {"__type__": "update"}
    demo.close()
