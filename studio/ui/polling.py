"""How often the tabs poll the database: quickly while something can change, slowly otherwise.

The worker writes only to the database, so the Train, History and Bake-off views poll it with
``gr.Timer``s. Always-on polling (Train every second, History and Bake-off every 3 s) cost an idle
tab about 22 % of a core in the server on a 2-core machine (issue 15 item 9). Each poll now sets
its own timer's interval from what it found: its fast interval while a run is running or waiting in
the queue, ``IDLE_SECONDS`` otherwise. The slow tick is the heartbeat that notices a run started
elsewhere (the CLI, another tab, a bake-off) and wakes the fast one; Start, Resume and Queue wake
their timer at once. No gradio state is kept here: the interval is the timer's own value, passed to
the poll as an input."""

from __future__ import annotations

from typing import Any

import gradio as gr

from studio.db import Database, RunStatus

IDLE_SECONDS = 10.0  # within 15 s, History still shows a run that changed elsewhere


def busy(db: Database) -> bool:
    """Can a poll find something new? True while a run is running or waits in the queue."""
    return bool(db.runs_with_status(RunStatus.RUNNING.value) or db.waiting_runs())


def interval(db: Database, fast: float, *, keep_fast: bool = False) -> float:
    """The interval a poll's timer should have now: ``fast`` while ``busy`` (or ``keep_fast``:
    the caller still waits for something, e.g. a stop to be seen done), else ``IDLE_SECONDS``."""
    return fast if keep_fast or busy(db) else IDLE_SECONDS


def pace(current: float | None, wanted: float) -> Any:
    """The timer's update: nothing re-sent while its interval is already right."""
    return gr.skip() if current == wanted else gr.update(value=wanted, active=True)


def wake(fast: float) -> Any:
    """A run was just started or queued from this page: poll quickly from now on."""
    return gr.update(value=fast, active=True)
