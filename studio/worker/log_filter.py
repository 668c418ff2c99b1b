"""Known-harmless library warnings kept out of a run's ``worker.log``.

A newcomer's first log opened with "Failed to load CPU gemm_4bit_forward … pip install kernels"
(bitsandbytes looking for an optional fast CPU kernel) and a transformers FutureWarning about a
renamed method: alarming, and nothing a user can act on. The list below is the one place that
says which lines are hidden and why. Only warnings are ever hidden, each by a specific pattern
(never an error, never a whole logger or category), and the log ends with one line saying how
many were hidden, so nothing disappears silently.

``install()`` runs first thing in the worker process (``studio/worker/__main__.py``), before the
imports that emit them.
"""

from __future__ import annotations

import atexit
import logging
import re
import sys
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class Harmless:
    pattern: str  # a regular expression searched in the warning's message
    why: str  # why a user can ignore it (for whoever reads this list)
    category: type[Warning] | None = None  # for ``warnings.warn`` messages; None: a logging record


HARMLESS: tuple[Harmless, ...] = (
    Harmless(r"Failed to load CPU gemm_4bit_forward from kernels-community",
             "bitsandbytes falls back to its own CPU kernel; the optional `kernels` package only "
             "speeds up 4-bit inference on some CPUs"),
    Harmless(r"`is_gradient_checkpointing` is deprecated", "a rename inside transformers, called by "
             "transformers or PEFT themselves", FutureWarning),
    Harmless(r"This implementation of AdamW is deprecated and will be removed", "galore-torch's "
             "GaLoreAdamW is a copy of an old transformers AdamW, notice included; the GaLore "
             "method runs it on purpose (transformers' optim='galore_adamw')", FutureWarning),
)

SUMMARY = "({n} known-harmless library warning{s} hidden: see studio/worker/log_filter.py)"


class _Counter:
    hidden = 0


def is_harmless(message: str, category: type[Warning] | None = None) -> bool:
    """Whether a warning (``category`` given) or a logged line (``category`` None) is on the list."""
    for entry in HARMLESS:
        if entry.category is None and category is not None:
            continue
        if entry.category is not None and (category is None or not issubclass(category, entry.category)):
            continue
        if re.search(entry.pattern, message):
            return True
    return False


class HarmlessFilter(logging.Filter):
    """Drops a logged record on the list; records above WARNING always pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.WARNING:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is shown as logging would show it
            return True
        if is_harmless(message):
            _Counter.hidden += 1
            return False
        return True


def _summary() -> None:
    if _Counter.hidden:
        n = _Counter.hidden
        print(SUMMARY.format(n=n, s="" if n == 1 else "s"), file=sys.stderr, flush=True)


def install() -> None:
    """Hide the listed warnings in this process from now on, and say how many at exit."""
    shown = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if is_harmless(str(message), category):
            _Counter.hidden += 1
            return
        shown(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning
    # Libraries that log without a handler of their own (bitsandbytes) reach ``lastResort``.
    if logging.lastResort is not None:
        logging.lastResort.addFilter(HarmlessFilter())
    for handler in logging.getLogger().handlers:
        handler.addFilter(HarmlessFilter())
    atexit.register(_summary)
