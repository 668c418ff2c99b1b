"""SIGTERM and SIGINT to a worker: stop like "stop and save", at the end of the current step.

A shutdown (``systemctl stop``, ``docker stop``, a logout, ``kill PID``) sends SIGTERM; Ctrl-C in
a terminal that runs ``python -m studio.worker`` sends SIGINT. Python's defaults would end the
process at once (SIGTERM) or raise ``KeyboardInterrupt`` anywhere, even inside a checkpoint
write; either way the run lost everything since its last checkpoint. Instead:

- before training starts (loading the model and data) there is nothing to save: the worker stops
  there and the run is cancelled;
- while training, the signal only sets a flag; ``StudioCallback.on_step_end`` turns it into the
  same stop a "save" request from the UI makes: the step in progress ends, a checkpoint is
  written, the run is cancelled with a note naming the signal, and Resume continues from there.
  An evaluation in progress is not waited for: it ends within one eval batch or generated token
  and the checkpoint is the last finished step's (``eval_stop.py``);
- after training, the final evaluation stops the same way (nothing of it is kept; that step's
  checkpoint is); saving the adapter is finished: the end is near and interrupting a save would
  leave a half-written adapter.

A second signal never interrupts anything: it is noted in the log and otherwise ignored, so a
checkpoint being written is not cut in half. SIGKILL remains the way to end a worker at once.
"""

from __future__ import annotations

import os
import signal
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StoppedBySignal(BaseException):
    """Raised in the main thread when a signal arrives before training began. A BaseException,
    like KeyboardInterrupt, so that no ``except Exception`` on the way swallows it."""

    def __init__(self, name: str):
        super().__init__(name)
        self.signal_name = name


class GracefulStop:
    """The worker's signal handlers and what they asked for. Phases: ``waiting`` (installed, not
    yet inside the run's error handling: remember), ``starting`` (raise ``StoppedBySignal``),
    ``training`` (flag, stop after the step or within an evaluation), ``finishing`` (flag: a
    final evaluation stops, the rest finishes)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.phase = "waiting"
        self._told_again = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def ignore_from_now(self) -> None:
        """The run's end is recorded: later signals are ignored. Python's finalisation puts
        SIG_DFL back for its own handlers (a late signal would still kill the process, with a
        misleading exit code), but leaves SIG_IGN alone."""
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def arm(self) -> None:
        """The run's error handling is in place: a signal from now on (or one that came
        earlier) stops the run before training."""
        self.phase = "starting"
        if self.signal_name is not None:
            raise StoppedBySignal(self.signal_name)

    def training_began(self) -> None:
        self.phase = "training"

    def training_ended(self) -> None:
        self.phase = "finishing"

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            if not self._told_again:  # once: a burst of signals must not flood the log
                self._told_again = True
                _note(f"{name} received again: already stopping; a checkpoint being written is "
                      "finished first (further signals are ignored; SIGKILL ends the worker at once).")
            return
        self.signal_name = name
        if self.phase == "starting":
            raise StoppedBySignal(name)
        if self.phase == "training":
            _note(f"{name} received: stopping after the current step (at once during an evaluation), "
                  "with a checkpoint")
        elif self.phase == "finishing":
            _note(f"{name} received after training: a final evaluation stops at once, with a "
                  "checkpoint; saving the adapter is finished first")


def _note(text: str) -> None:
    # os.write, not print: a handler that prints while the main thread is inside a print to the
    # same stream raises "reentrant call". On a full disk the line is simply lost.
    try:
        os.write(2, (text + "\n").encode())
    except OSError:
        pass
