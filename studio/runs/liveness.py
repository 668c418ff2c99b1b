"""Is a run's worker process still there, is it really ours, and ending one that hangs.

``launch.reconcile`` must never mark a run failed while its worker lives on: the worker would
go on training and saving checkpoints beside a "failed" row, a Resume would start a second worker
on the same run folder, and the worker's own end would later overwrite the row again. So a worker
that is alive but silent for the hang timeout (no heartbeat of any kind: the training loop beats
at every step, micro-step, evaluation batch, generated token and checkpoint, see
``studio.worker.trainer``) is killed first, and only then marked failed.

A pid alone is not proof: after a restart of the machine the number may belong to any program.
A process is taken for the run's worker only if its command line is ``... -m studio.worker
RUN_ID`` (directly, or under ``torchrun``) and it works in this studio home (``PEFT_STUDIO_HOME``
as ours: another home has its own run 1); nothing else is ever signalled.

A run of several processes (``multiprocess.py``) has a launcher (the pid the run row names) and
its ranks, each of which torchrun starts in a session of its own: killing the launcher's group
does not reach them, and a launcher killed with SIGKILL leaves them training. So a kill ends
every process of the run, found by command line (``run_processes``), and ``launch.reconcile``
kills ranks that outlived their launcher before it marks the run failed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

from studio import config

KILL_WAIT_S = 10.0  # SIGKILL cannot be caught; this only covers a busy kernel
# A worker exits a few seconds after writing its end (freeing the model, starting the next queued
# run, the interpreter's shutdown): a Resume clicked in that window waits for it, no longer.
EXIT_WAIT_S = 15.0


def worker_process(pid: int | None, run_id: int) -> psutil.Process | None:
    """The live process ``pid`` if it is the worker of run ``run_id`` (a stopped, i.e. paused,
    process counts as live), else None (gone, a zombie, or another program)."""
    if not pid:
        return None
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        args = process.cmdline()
        home = process.environ().get(config.HOME_ENV)
    except (psutil.Error, OSError):  # gone, or another user's (then not ours either)
        return None
    if _resolved(home) != _resolved(os.environ.get(config.HOME_ENV)):
        return None
    for i, arg in enumerate(args[:-2]):  # "-m studio.worker <id>", anywhere in the command line
        if arg == "-m" and args[i + 1] == "studio.worker" and args[i + 2] == str(run_id):
            return process
    return None


def _resolved(home: str | None) -> Path | None:
    return Path(home).expanduser().resolve() if home else None


def kill_worker(process: psutil.Process, run_id: int, child: subprocess.Popen | None = None) -> int | None:
    """SIGKILL the worker and everything in its process group (a torchrun launcher and its
    ranks share it; our workers lead their own session, see ``launch``), and wait until it is
    gone. ``child``: its ``Popen`` when the caller started it (waited through it, so its exit
    code is not lost to another wait). Returns the exit code when it can be read (-9 for our
    own child; None for another's); ``TimeoutError`` if it is still there after
    ``KILL_WAIT_S``. Never signals the caller's own process group."""
    try:
        group = os.getpgid(process.pid)
        # The group is the run's own when its leader is a worker of the run: the worker itself,
        # or the torchrun launcher of this rank.
        if group != os.getpgrp() and (group == process.pid or worker_process(group, run_id) is not None):
            os.killpg(group, signal.SIGKILL)
        else:
            process.kill()
    except (ProcessLookupError, psutil.NoSuchProcess):
        pass
    kill_run(run_id, skip=process.pid)  # a launcher's ranks, each in its own session
    try:
        if child is not None:
            return child.wait(timeout=KILL_WAIT_S)
        return process.wait(timeout=KILL_WAIT_S)
    except (psutil.TimeoutExpired, subprocess.TimeoutExpired):
        raise TimeoutError(f"the worker (pid {process.pid}) is still there {KILL_WAIT_S:.0f} s "
                           "after SIGKILL") from None
    except (psutil.Error, ChildProcessError):  # already gone and reaped elsewhere
        return None


def wait_gone(process: psutil.Process, child: subprocess.Popen | None = None,
              timeout: float | None = None) -> bool:
    """True once the worker has ended (within ``timeout``, default ``EXIT_WAIT_S``)."""
    timeout = EXIT_WAIT_S if timeout is None else timeout
    try:
        if child is not None:
            child.wait(timeout=timeout)
        else:
            process.wait(timeout=timeout)
        return True
    except (psutil.TimeoutExpired, subprocess.TimeoutExpired):
        return False
    except (psutil.Error, ChildProcessError):
        return True


def run_processes(run_id: int) -> list[psutil.Process]:
    """Every live process of run ``run_id``'s worker in this studio home: the worker, or a
    launcher and its ranks, found by command line (``worker_process``), never by group alone."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid == os.getpid() or "studio.worker" not in (proc.info.get("cmdline") or []):
            continue  # the cheap test first: reading another process's environment costs more
        process = worker_process(proc.pid, run_id)
        if process is not None:
            found.append(process)
    return found


def kill_run(run_id: int, skip: int | None = None) -> list[int]:
    """SIGKILL every process of the run (``run_processes``) but ``skip``, each with its process
    group when it leads one (a rank's session holds what the rank started), and wait until they
    are gone. Returns their pids; ``TimeoutError`` if one outlives ``KILL_WAIT_S``. Never
    signals the caller's own process group."""
    processes = [p for p in run_processes(run_id) if p.pid != skip]
    for process in processes:
        try:
            if os.getpgid(process.pid) == process.pid != os.getpgrp():
                os.killpg(process.pid, signal.SIGKILL)
            else:
                process.kill()
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    deadline = time.monotonic() + KILL_WAIT_S
    alive = processes
    while alive:  # a zombie counts as gone: its parent (maybe not us, maybe init) reaps it
        alive = [p for p in alive if _lives(p)]
        if alive and time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id}'s processes {[p.pid for p in alive]} are still there "
                               f"{KILL_WAIT_S:.0f} s after SIGKILL")
        if alive:
            time.sleep(0.05)
    return [p.pid for p in processes]


def _lives(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
