"""A serve child never outlives the app that started it, however the app dies.

The app's ``atexit`` and SIGTERM handler (tests/test_serve_process.py) cannot run when the app is
killed with SIGKILL; the lifeline pipe (``studio.serve.process`` passes ``--lifeline-fd``,
``studio.cli_serve.watch_lifeline`` reads it) is what stops the child then. Real processes
throughout: an app process that starts a real ``peft-studio serve`` child on the tiny model, a
real SIGKILL, a real port.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from studio import projects
from studio.db import Database
from studio.serve.process import serve_dir

# The app, as far as serving goes: the Serve tab's Start, then alive until killed. It never calls
# stop_on_exit: nothing of the app's own exit handling may be what stops the child here.
APP = """
import sys, time
from studio.serve import process
status = process.SERVER.start(process.ServeSettings(project=int(sys.argv[1]), port=0), timeout=240)
print(status.pid, status.url, flush=True)
time.sleep(600)
"""


def gone(pid: int, timeout: float) -> bool:
    """Whether ``pid`` ends within ``timeout`` s. The child is not ours (its parent was the app;
    it is reparented when the app dies), so a zombie awaiting its new parent counts as ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def test_a_serve_child_ends_when_its_app_is_killed_with_sigkill(tiny_chat_model):
    project = projects.create_project(Database(), "orphan", model_source=str(tiny_chat_model))
    app = subprocess.Popen([sys.executable, "-c", APP, str(project.id)], stdout=subprocess.PIPE,
                           text=True, start_new_session=True)
    child = None
    try:
        line = app.stdout.readline()  # the app's line once the child is ready (or EOF if it failed)
        assert line, f"the app did not start the server (exit {app.wait(timeout=30)})"
        child, url = int(line.split()[0]), line.split()[1]
        port = int(url.rsplit(":", 1)[1].split("/")[0])

        app.kill()  # SIGKILL: no atexit, no handler, nothing of the app runs any more
        assert app.wait(timeout=30) == -signal.SIGKILL
        # Generous: a loaded machine may take a while to schedule the child's clean shutdown.
        assert gone(child, timeout=60), f"the serve child {child} outlived its SIGKILLed app"

        with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
            sock.connect(("127.0.0.1", port))  # nobody listens there any more
        with socket.socket() as sock:  # and a restarted app can listen there again
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
        log = (serve_dir() / "serve.log").read_text(encoding="utf-8", errors="replace")
        assert "the app that started this server is gone: stopping" in log, log
        assert "Traceback" not in log and "killing it" not in log, log  # the clean stop, not the fallback
    finally:
        if app.poll() is None:
            app.kill()
            app.wait(timeout=30)
        if child is not None and not gone(child, timeout=0.1):
            os.killpg(child, signal.SIGKILL)  # its own group (the app started it so)


# A server that ignores SIGTERM (or takes it where no handler stops anything): the lifeline's
# fallback kills it. Only the watcher is exercised here, in a real process, without the model.
DEAF = """
import signal, sys, time
from studio.cli_serve import watch_lifeline
signal.signal(signal.SIGTERM, signal.SIG_IGN)
watch_lifeline(int(sys.argv[1]), grace=0.5)
print("watching", flush=True)
time.sleep(120)
"""


def test_a_server_that_ignores_sigterm_is_killed_after_the_grace():
    read_end, write_end = os.pipe()
    deaf = subprocess.Popen([sys.executable, "-c", DEAF, str(read_end)], pass_fds=(read_end,),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    os.close(read_end)
    try:
        assert deaf.stdout.readline() == "watching\n", deaf.stderr.read() if deaf.poll() is not None else ""
        assert deaf.poll() is None  # an open lifeline stops nothing
        os.close(write_end)  # what the kernel does when the app dies
        write_end = None
        assert deaf.wait(timeout=60) == -signal.SIGKILL
        stderr = deaf.stderr.read()
        assert "the app that started this server is gone: stopping" in stderr, stderr
        assert "not stopped 0.5 s after SIGTERM: killing it" in stderr, stderr
    finally:
        if write_end is not None:
            os.close(write_end)
        if deaf.poll() is None:
            deaf.kill()
            deaf.wait(timeout=30)
