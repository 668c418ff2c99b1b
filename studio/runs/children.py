"""The worker processes this process started: their ``Popen`` objects, reaped at every poll so
that none stays a zombie, and their exit codes, kept per (pid, run) after reaping (a reaped pid
can be reused by any process, so a code is only believed for the run its worker was started for).
"""

from __future__ import annotations

import subprocess

import psutil

processes: dict[int, subprocess.Popen] = {}  # started here and not reaped yet
run_of: dict[int, int] = {}  # their pid -> run id
_exited: dict[tuple[int, int], int] = {}
_EXITED_KEPT = 256


def remember(proc: subprocess.Popen, run_id: int) -> None:
    """A worker just started for ``run_id`` (the run first: a concurrent poll sees a whole entry)."""
    run_of[proc.pid] = run_id
    processes[proc.pid] = proc


def reap() -> None:
    """Collect every finished worker this process started, whether or not anyone looks at its
    run (a worker that wrote its own end is never reconciled, and stayed a zombie). Only our
    own Popen objects are polled: ``os.waitpid(-1)`` would steal the exit codes of other
    children of this process (``subprocess.run`` elsewhere in the UI)."""
    for pid, proc in list(processes.items()):
        code = proc.poll()
        if code is None:
            continue
        run_id = run_of.pop(pid, None)
        if run_id is not None:  # recorded before the Popen is dropped: a concurrent poll sees one
            _exited[(pid, run_id)] = code
        processes.pop(pid, None)
    while len(_exited) > _EXITED_KEPT:
        _exited.pop(next(iter(_exited)))


def exit_code(pid: int, run_id: int | None = None) -> int | None:
    """The worker's exit code if it has ended (reaping our own children), else None."""
    proc = processes.get(pid)
    if proc is not None:
        return proc.poll()
    if (pid, run_id) in _exited:
        return _exited[(pid, run_id)]
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return -1
        return None
    except psutil.NoSuchProcess:
        return -1  # gone, and not our child: the code is unknown
