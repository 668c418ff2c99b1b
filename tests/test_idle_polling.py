"""Issue 15 item 9: an idle tab must not poll every second.

The polls of a freshly built app (found among its registered event functions, as in
test_train_ui.py) are called on a real database: with no run active each one slows its own timer
to ``polling.IDLE_SECONDS``, a run that starts elsewhere (claimed under a live stand-in process, as
the CLI's worker would) puts it back to its fast interval, and the end of the run slows it again.
History's polls are switched off when another main tab is opened and on when History is."""

from __future__ import annotations

import gradio as gr
import pytest

from studio import projects
from studio.db import Database, RunStatus
from studio.runs import launch
from studio.runspec import RunSpec
from studio.ui import bakeoff_tab, history_tab, polling, train_tab

SKIP = {"__type__": "update"}  # nothing re-sent
SPEC = RunSpec(sample_task="dates", max_steps=2)


def interval_of(update) -> float | None:
    return update.get("value") if isinstance(update, dict) else None


@pytest.fixture
def app(db):
    from studio.ui.app import build_app

    project = projects.create_project(db, "Idle")
    demo = build_app(Database())
    fns = {getattr(f.fn, "__name__", ""): f for f in demo.fns.values()}
    yield db, project, demo, fns
    demo.close()


def test_polls_slow_down_with_no_active_run_and_wake_when_one_starts(app, sleeper):
    db, project, _, fns = app
    poll, on_poll, on_tick = fns["poll"].fn, fns["on_poll"].fn, fns["on_tick"].fn
    fresh = {"key": None, "choices": None}
    history_poll = lambda period: on_poll(project.id, None, None, period, "", [], [], "created_at", True)

    # Nothing running: every poll asks for the slow interval, once (then nothing is re-sent).
    assert interval_of(poll(project.id, None, fresh, None, train_tab.POLL_SECONDS)[-1]) == polling.IDLE_SECONDS
    assert poll(project.id, None, fresh, None, polling.IDLE_SECONDS)[-1] == SKIP
    assert interval_of(history_poll(history_tab.LIVE_SECONDS)[-1]) == polling.IDLE_SECONDS
    assert interval_of(on_tick(None, bakeoff_tab.POLL_SECONDS)[-1]) == polling.IDLE_SECONDS

    # A run started elsewhere (the CLI, another tab): the slow tick notices it and wakes the fast one.
    run = launch.create_run(db, project.id, SPEC, name="from the CLI")
    assert db.claim_run(run.id, sleeper.pid)[0] is not None
    train = poll(project.id, None, fresh, None, polling.IDLE_SECONDS)
    assert interval_of(train[-1]) == train_tab.POLL_SECONDS and train[0]["value"] == run.id  # and followed
    assert poll(project.id, run.id, train[-4], None, train_tab.POLL_SECONDS)[-1] == SKIP
    assert interval_of(history_poll(polling.IDLE_SECONDS)[-1]) == history_tab.LIVE_SECONDS
    assert interval_of(on_tick(None, polling.IDLE_SECONDS)[-1]) == bakeoff_tab.POLL_SECONDS

    # A stop asked for from this page keeps the Train poll fast until it is seen done, once.
    db.update_run(run.id, status=RunStatus.CANCELLED.value)
    done = poll(project.id, run.id, train[-4], [run.id, "save"], train_tab.POLL_SECONDS)
    assert done[-2] is None and interval_of(done[-1]) == polling.IDLE_SECONDS
    assert interval_of(history_poll(history_tab.LIVE_SECONDS)[-1]) == polling.IDLE_SECONDS

    # A run waiting in the queue (a bake-off's next one) will start without a click: stay fast.
    waiting = launch.create_run(db, project.id, SPEC, name="queued")
    db.enqueue_runs([waiting.id])  # not dispatched: the Train poll only reconciles
    assert interval_of(poll(project.id, run.id, done[-4], None, polling.IDLE_SECONDS)[-1]) == train_tab.POLL_SECONDS


def test_history_polls_run_only_while_history_is_open(app):
    _, _, demo, fns = app
    timers = [b for b in demo.blocks.values() if b.get_block_name() == "timer"]
    history_timers = [t for t in timers if t.value == history_tab.LIVE_SECONDS]
    assert len(timers) == 3 and len(history_timers) == 2  # the runs table's and the Bake-off's
    switch = fns["history_polls"]
    tabs = next(b for b in demo.blocks.values() if b.elem_id == "main-tabs")
    assert switch.targets == [(tabs._id, "select")]
    assert {o._id for o in switch.outputs} == {t._id for t in history_timers}

    def opened(label):  # what the tab strip's select sends when ``label`` is opened
        return [u.active for u in switch.fn(gr.SelectData(None, {"value": label, "index": 0, "selected": True}))]

    assert opened("History") == [True, True]
    for other in ("Data", "Method", "Train", "Compare", "Export"):
        assert opened(other) == [False, False]
