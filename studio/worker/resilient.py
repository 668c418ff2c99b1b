"""The worker's database writes, made to ride out a locked or full history file.

Another process may hold SQLite's write lock for longer than the engine's busy timeout (10 s):
a long transaction in the UI, a backup tool, a user's ``sqlite3`` shell. A full disk makes
SQLite refuse writes too ("database or disk is full"). Neither may cost training that is
already done, so the worker never writes from its training loop:

- ``BackgroundWriter`` takes metrics, heartbeats and checkpoint rows into a queue and writes them
  from one thread, in order, retrying with back-off while the file is locked or full. The loop
  goes on training meanwhile and the queue catches up, with each metric's original wall time, as
  soon as the lock is free. While the file is healthy the loop waits the few milliseconds a
  write takes (``settle``), so the history is as current as before; once a write lags, it stops
  waiting. A skipped heartbeat is harmless: ``launch.reconcile`` calls a heartbeat stale only
  after ten minutes. Outside the training loop, where the work is library calls that report no
  progress (loading or downloading the model, tokenizing, a bake-off's measurements), the
  thread beats on a timer (``beat_on_timer``); inside it the loop's own beats are the sign of
  life, so a loop that hangs goes silent and is caught.
- ``Patient`` wraps the ``Database`` for the writes that must happen (the run's status at start
  and at the end): each call is retried for minutes rather than given up.

Why a module of the worker, not of ``studio.db``: what may wait, what may be skipped and what
must be retried is the worker's policy; the database layer stays a plain query layer. Reads
are not affected: in WAL mode a reader never waits for a writer.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from studio.db import Database
from studio.errors import exception_chain

# SQLite's primary result codes that mean "not now" rather than "never": the file is locked
# by another connection (BUSY, LOCKED) or the disk is full (FULL; space may come back, and the
# worker frees its reserve before its last writes, see ``diskspace``).
TRANSIENT_CODES = {5: "locked", 6: "locked", 13: "full"}
TRANSIENT_MESSAGES = ("database is locked", "database table is locked", "database or disk is full")

# How long the writes that end a run keep trying (env PEFT_STUDIO_DB_PATIENCE_S overrides, in
# seconds): long enough to outlast any ordinary lock, short of hanging forever on a broken file.
PATIENCE_S = float(os.environ.get("PEFT_STUDIO_DB_PATIENCE_S", 20 * 60))
# A full disk seldom frees itself: past this, the worker stops waiting for space and ends (and
# ``launch.reconcile`` records its end from the log if even that could not be written).
FULL_PATIENCE_S = min(PATIENCE_S, 60.0)
FIRST_BACKOFF_S, MAX_BACKOFF_S = 0.1, 5.0
TIMED_BEAT_S = 30.0  # the timer's heartbeat outside the training loop (a twentieth of the timeout)


def transient_reason(error: BaseException) -> str | None:
    """Why SQLite said "not now" ("locked" or "full") if ``error`` or what it wraps is such a
    refusal, else None."""
    for exc in exception_chain(error):
        if type(exc).__name__ == "DatabaseLockedError":  # studio.db's name for a locked file
            return "locked"
        if isinstance(exc, sqlite3.Error):
            code = getattr(exc, "sqlite_errorcode", None)
            if code is not None and code & 0xFF in TRANSIENT_CODES:
                return TRANSIENT_CODES[code & 0xFF]
            text = str(exc).lower()
            for message in TRANSIENT_MESSAGES:
                if message in text:
                    return "full" if "full" in message else "locked"
    return None


def say(text: str) -> None:
    """A line in worker.log that may not fail: on a full disk even the log cannot grow."""
    try:
        print(text, flush=True)
    except (OSError, ValueError):
        pass


def retry(call: Callable[[], Any], patience_s: float = PATIENCE_S, what: str = "database write") -> Any:
    """``call()``, retried with back-off while SQLite says "not now", for up to ``patience_s``.
    Any other error, or the last "not now" after the patience ran out, is raised."""
    started = time.monotonic()
    backoff, told = FIRST_BACKOFF_S, False
    while True:
        try:
            return call()
        except Exception as exc:
            reason = transient_reason(exc)
            limit = min(patience_s, FULL_PATIENCE_S) if reason == "full" else patience_s
            if reason is None or time.monotonic() + backoff > started + limit:
                raise
            if not told:
                say(f"{what}: the history file is {reason}; retrying for up to {patience_s:.0f} s")
                told = True
            time.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)


class Patient:
    """The ``Database`` with every method call retried (``retry``) while the file is locked or
    full: for the writes that must not be given up, like a run's final status."""

    def __init__(self, db: Database, patience_s: float = PATIENCE_S):
        self._db, self._patience_s = db, patience_s

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._db, name)
        if not callable(method):
            return method

        def patiently(*args: Any, **kwargs: Any) -> Any:
            return retry(lambda: method(*args, **kwargs), self._patience_s, f"Database.{name}")
        return patiently


class BackgroundWriter:
    """Writes queued database calls from one thread, in order, riding out locks and a full disk.

    ``submit`` never blocks. ``settle`` lets the training loop wait for the queue to drain while
    writes are quick, and not at all once they lag. ``close`` drains what is left, retrying up to
    its patience, and says what could not be written."""

    def __init__(self, db: Database, run_id: int):
        self.db, self.run_id = db, run_id
        self._queue: deque[tuple[str | None, Callable[[], Any]]] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._abandon = False
        self.lagging = False  # a settle timed out: the loop stops waiting until the queue drains
        self.blocked: str | None = None  # "locked"/"full" while the head of the queue is refused
        self.written = 0
        self.dropped: list[str] = []
        # Beat on a timer until the training loop takes over (see beat_on_timer): the worker
        # starts by loading, which reports no progress.
        self._timer_activity: dict[str, Any] | None = {"phase": "preparing", "since": time.time()}
        self._timer_on = True
        self._thread = threading.Thread(target=self._run, name=f"db-writer-run-{run_id}", daemon=True)
        self._thread.start()

    # ---- what the training loop calls ----
    def submit(self, call: Callable[[], Any], key: str | None = None) -> None:
        """Queue ``call``. A ``key`` coalesces: a call with a key already waiting is not queued
        twice (heartbeats: one pending stamp says the same as ten)."""
        with self._cond:
            if self._closing:
                raise RuntimeError("the writer is closed")
            if key is not None and any(k == key for k, _ in self._queue):
                return
            self._queue.append((key, call))
            self._cond.notify_all()

    def log_metrics(self, step: int, values: dict[str, float], wall_time: float | None = None) -> None:
        wall = time.time() if wall_time is None else wall_time  # when measured, not when written
        self.submit(lambda: self.db.log_metrics(self.run_id, step, values, wall_time=wall))

    def heartbeat(self) -> None:
        self.submit(lambda: self.db.heartbeat(self.run_id), key="heartbeat")

    def beat_on_timer(self, activity: dict[str, Any] | None) -> None:
        """Beat every ``TIMED_BEAT_S`` with ``activity`` from now on (None: stop; the training
        loop beats itself). For phases made of calls that report no progress."""
        with self._cond:
            self._timer_on, self._timer_activity = activity is not None, activity
            self._cond.notify_all()

    def settle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for everything queued to be written; True if it was. Returns at
        once while the writer lags behind a lock, so a locked file never slows training twice."""
        with self._cond:
            if self.lagging:
                return not self._queue
            done = self._cond.wait_for(lambda: not self._queue, timeout)
            if not done:
                self.lagging = True
            return done

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self, patience_s: float = PATIENCE_S) -> bool:
        """Write everything still queued (retrying up to ``patience_s``), then stop the thread.
        True if nothing was lost; otherwise what was lost is said in worker.log."""
        started = time.monotonic()

        def waited_enough() -> bool:
            limit = min(patience_s, FULL_PATIENCE_S) if self.blocked == "full" else patience_s
            return time.monotonic() - started >= limit

        with self._cond:
            self._closing = True
            self._cond.notify_all()
            while self._queue and not waited_enough():
                self._cond.wait(0.5)
            drained = not self._queue
            if not drained:
                self._abandon = True
                lost = len(self._queue)
                self._cond.notify_all()
        if not drained:
            say(f"{lost} database writes of run {self.run_id} could not be made in {patience_s:.0f} s "
                f"(the history file stayed {self.blocked or 'unwritable'}); their metrics are lost")
        self._thread.join(timeout=max(1.0, min(patience_s, 30.0)))
        return drained and not self.dropped

    # ---- the thread ----
    def _run(self) -> None:
        backoff = FIRST_BACKOFF_S
        while True:
            with self._cond:
                ready = self._cond.wait_for(lambda: self._queue or self._closing or self._abandon,
                                            TIMED_BEAT_S if self._timer_on else None)
                if self._abandon or (self._closing and not self._queue):
                    return
                if not ready:  # the timer ran out with nothing to write: a timed heartbeat
                    activity = self._timer_activity
                    self._queue.append(("heartbeat", lambda: self.db.heartbeat(self.run_id, activity)))
                key, call = self._queue[0]
            try:
                call()
            except Exception as exc:
                reason = transient_reason(exc)
                if reason is not None:  # keep it at the head of the queue and try again
                    if self.blocked is None:
                        say(f"the history file is {reason}: training goes on, its records wait "
                            f"in memory ({self.pending()} so far) and are written when it can")
                    self.blocked = reason
                    with self._cond:
                        self._cond.wait_for(lambda: self._abandon, backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF_S)
                    continue
                # Not a state that passes (the run was deleted, a bad value): drop this one
                # write, keep the others.
                self.dropped.append(f"{type(exc).__name__}: {exc}")
                say(f"a database write of run {self.run_id} failed and was dropped: "
                    f"{type(exc).__name__}: {exc}")
            else:
                self.written += 1
                if self.blocked is not None:
                    say(f"the history file is writable again; catching up ({self.pending() - 1} records waiting)")
                self.blocked, backoff = None, FIRST_BACKOFF_S
            with self._cond:
                self._queue.popleft()
                if not self._queue:
                    self.lagging = False
                self._cond.notify_all()


class SilentWriter:
    """The writer of a rank other than the main one (``ranks.is_main``): it writes nothing. Only
    rank 0 reports a run (metrics, heartbeats, checkpoint rows); the others train beside it with
    the same callback, which calls this writer and is done."""

    lagging, blocked, written = False, None, 0

    def __init__(self) -> None:
        self.dropped: list[str] = []

    def submit(self, call: Callable[[], Any], key: str | None = None) -> None:
        pass

    def log_metrics(self, step: int, values: dict[str, float], wall_time: float | None = None) -> None:
        pass

    def heartbeat(self) -> None:
        pass

    def beat_on_timer(self, activity: dict[str, Any] | None) -> None:
        pass

    def settle(self, timeout: float) -> bool:
        return True

    def pending(self) -> int:
        return 0

    def close(self, patience_s: float = PATIENCE_S) -> bool:
        return True


def current_cancel_request(db: Database, run_id: int) -> str | None:
    """The run's pending cancel request, by a read (never blocked by another writer in WAL
    mode); None when even the read fails, so a locked file never stops training."""
    try:
        run = db.get_run(run_id)
    except Exception as exc:
        if transient_reason(exc) is None:
            raise
        return None
    return run.cancel_request if run is not None else None

