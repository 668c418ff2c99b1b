"""The app's ``peft-studio serve`` child: started, watched and stopped from the Serve tab.

A server holds a model in memory for as long as it runs, so it lives in its own process
(``python -m studio serve ...``, what ``peft-studio serve`` runs), never in the UI process, which
never imports torch. At most one such child per app process (``SERVER``): a second Start is
refused with the one that runs and where.

- The child gets its own process group (a Ctrl-C in the app's terminal is not its signal) and
  writes stdout and stderr to ``<projects>/.serve/serve.log``; the app waits, with a timeout,
  for the one ready line the CLI prints (``PEFT Studio serving N models at http://HOST:PORT/v1``)
  and takes the real URL from it (``--port 0`` lets the child pick a free port). A child that
  exits first is reported with the tail of its log: its own refusal says what was wrong.
- An API key is written to a 0600 file beside the log and passed as ``--api-key-file``: on the
  command line it would be readable by every user of the machine (``ps``, ``/proc/PID/cmdline``).
- ``stop()`` sends SIGTERM to the child's group and SIGKILL after a grace period.
- ``status()`` notices a child that died on its own and says how (exit code, log tail).
- The child is stopped when the app exits: ``atexit`` for a normal exit, and a SIGTERM handler
  (``stop_on_exit``, installed from the main thread) because SIGTERM's default action ends a
  process without running ``atexit`` and the child, in its own group, would outlive the app.
- And when the app dies without running any of that (SIGKILL, the OOM killer, a crash): the
  child gets the read end of a pipe whose write end only the app holds (``--lifeline-fd``).
  The kernel closes the write end when the app dies, however it dies; the child reads EOF and
  stops as on SIGTERM (``cli_serve.watch_lifeline``). Chosen over Linux's PR_SET_PDEATHSIG,
  which fires when the *thread* that started the child ends (a Start runs on one of Gradio's
  worker threads, which anyio ends after 10 s idle: a healthy server would be killed), is
  Linux-only, and races with a parent that dies before the child sets it; an EOF is never
  missed, whenever the child starts to read.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from studio import config
from studio.ui.launch import is_loopback

# The CLI's ready line (studio/cli_serve.py); "1 models" and "1 model" both read.
READY = re.compile(r"^PEFT Studio serving (\d+) models? at (https?://\S+/v1)\s*$")
LOG_NAME = "serve.log"
KEY_NAME = "api-key"
READY_TIMEOUT = 600.0  # the first start of the embedded model converts it (tens of seconds on a CPU)
STOP_GRACE = 10.0
TAIL_CHARS = 2000


class ServeRefused(Exception):
    """A start refused, or a child that failed before it was ready; the message says why."""


@dataclass(frozen=True)
class ServeSettings:
    """What the Serve tab (or a test) asks for; mirrors ``peft-studio serve``'s flags."""
    project: int | str
    runs: str = "all"                 # "all" or "3,5,8"
    host: str = config.DEFAULT_HOST
    port: int = 8000                  # 0: the child picks a free port
    api_key: str | None = None
    max_active: int = 8
    model: str | None = None          # None: the project's own model

    def check(self) -> None:
        """Refuse, before anything is started, what the child would refuse or should never see."""
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ServeRefused(f"port: expected a whole number from 0 to 65535 (0 picks a free port), got {self.port!r}")
        if not isinstance(self.max_active, int) or not 1 <= self.max_active <= 1024:
            raise ServeRefused(f"max active adapters: expected a whole number from 1 to 1024, got {self.max_active!r}")
        host = (self.host or "").strip()
        if not host or any(c.isspace() for c in host):
            raise ServeRefused(f"host: expected an address such as {config.DEFAULT_HOST}, got {self.host!r}")
        key = self.api_key or ""
        if key and (key != key.strip() or "\n" in key or "\r" in key):
            raise ServeRefused("API key: leading or trailing spaces and line breaks are not allowed")
        if not key and not is_loopback(host):
            raise ServeRefused(f"Refusing to serve on {host} without an API key: anyone who can reach "
                               "this machine could use your models. Set an API key, or serve on "
                               f"{config.DEFAULT_HOST} (this machine only).")
        runs = self.runs.strip()
        if runs != "all" and not re.fullmatch(r"\d+(,\d+)*", runs):
            raise ServeRefused(f"runs: expected 'all' or run ids separated by commas, got {self.runs!r}")


@dataclass(frozen=True)
class ServeStatus:
    state: str                        # "running", "starting" or "stopped"
    url: str | None = None            # the base URL clients use (…/v1), from the ready line
    pid: int | None = None
    started_at: float | None = None   # time.time() when it became ready
    models: int | None = None         # how many models it said it serves
    settings: ServeSettings | None = None
    reason: str | None = None         # stopped: why (stopped by you, exit code and log tail)
    log: Path | None = None

    @property
    def running(self) -> bool:
        return self.state == "running"


def serve_dir() -> Path:
    """``<projects>/.serve``: the log and the key file (a dot folder: no project folder is named so)."""
    path = config.projects_dir() / ".serve"
    path.mkdir(parents=True, exist_ok=True)
    return path


def local_url(url: str) -> str:
    """The URL this machine uses to reach a server listening on ``url``'s host: a wildcard
    address (0.0.0.0, ::) is not one to connect to, its loopback is."""
    return url.replace("://0.0.0.0:", "://127.0.0.1:").replace("://[::]:", "://[::1]:")


def write_key_file(key: str) -> Path:
    """The key in a file only its owner reads (0600 from creation, and again if it existed)."""
    path = serve_dir() / KEY_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, key.encode("utf-8"))
    finally:
        os.close(fd)
    return path


def command(settings: ServeSettings, key_file: Path | None) -> list[str]:
    argv = [sys.executable, "-m", "studio", "serve", "--project", str(settings.project),
            "--runs", settings.runs.strip(), "--host", settings.host.strip(), "--port", str(settings.port),
            "--max-active", str(settings.max_active)]
    if settings.model:
        argv += ["--model", settings.model]
    if key_file is not None:
        argv += ["--api-key-file", str(key_file)]
    return argv


def log_tail(path: Path | None, chars: int = TAIL_CHARS) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - chars))
            return f.read().decode("utf-8", "replace").strip()
    except (OSError, TypeError):
        return ""


def _exit_words(code: int) -> str:
    return f"was ended by signal {-code}" if code < 0 else f"exited with code {code}"


@dataclass
class _Child:
    proc: subprocess.Popen
    settings: ServeSettings
    log: Path
    key_file: Path | None
    lifeline: int | None = None       # the pipe's write end: open while the child is ours
    url: str | None = None
    models: int | None = None
    started_at: float | None = None
    stopping: bool = False            # stop() was asked: its exit is not a failure
    ready: threading.Event = field(default_factory=threading.Event)


class ServeProcess:
    """One serve child at a time. Thread-safe: Gradio runs handlers on several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._child: _Child | None = None
        self._last = ServeStatus("stopped")

    def start(self, settings: ServeSettings, timeout: float = READY_TIMEOUT,
              on_wait=None) -> ServeStatus:
        """Start the child and wait for its ready line. ``on_wait(seconds, log_tail)`` is called
        about twice a second while it loads. ``ServeRefused`` when a child already runs, the
        settings are refused, or the child exits or stays silent past ``timeout``."""
        settings.check()
        with self._lock:
            current = self._status_locked()
            if current.state != "stopped":
                where = current.url or f"{current.settings.host}:{current.settings.port} (still starting)"
                raise ServeRefused(f"A server is already {current.state} (pid {current.pid}, {where}): "
                                   "stop it first. The app runs one server at a time.")
            key_file = write_key_file(settings.api_key) if settings.api_key else None
            log = serve_dir() / LOG_NAME
            # The lifeline: both ends are non-inheritable (os.pipe's default), so no other child
            # of the app (a training worker) holds the write end; only the serve child gets
            # the read end (pass_fds), and the app closes its copy once the child has it.
            lifeline_read, lifeline = os.pipe()
            try:
                argv = command(settings, key_file) + ["--lifeline-fd", str(lifeline_read)]
                with open(log, "wb") as out:  # a fresh log per start: the tail is this start's
                    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            pass_fds=(lifeline_read,),
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
            except BaseException:
                os.close(lifeline)
                raise
            finally:
                os.close(lifeline_read)
            child = self._child = _Child(proc, settings, log, key_file, lifeline)
        _stop_on_exit_once()
        return self._wait_ready(child, timeout, on_wait)

    def _wait_ready(self, child: _Child, timeout: float, on_wait) -> ServeStatus:
        began = time.monotonic()
        while True:
            match = _ready_match(child.log)
            if match:
                with self._lock:
                    child.models, child.url = int(match.group(1)), match.group(2)
                    child.started_at = time.time()
                    child.ready.set()
                return self.status()
            code = child.proc.poll()
            if code is not None:
                status = self.status()  # records why, and forgets the child
                if child.stopping:
                    raise ServeRefused("The server was stopped before it was ready.")
                raise ServeRefused(status.reason)
            waited = time.monotonic() - began
            if waited > timeout:
                self.stop()
                reason = (f"The server did not say it was ready within {timeout:.0f} s and was stopped. "
                          f"The end of its log ({child.log}):\n{log_tail(child.log)}")
                with self._lock:
                    if self._child is None:
                        self._last = ServeStatus("stopped", None, child.proc.pid, None, None, child.settings,
                                                 reason, child.log)
                raise ServeRefused(reason)
            if on_wait is not None:
                on_wait(waited, log_tail(child.log, 300))
            time.sleep(0.25)

    def stop(self, grace: float = STOP_GRACE) -> ServeStatus:
        """SIGTERM to the child's process group, SIGKILL after ``grace`` seconds; idempotent."""
        with self._lock:
            child = self._child
            if child is None:
                return self._last
            child.stopping = True
        _signal_group(child.proc, signal.SIGTERM)
        try:
            child.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_group(child.proc, signal.SIGKILL)
            child.proc.wait()
        return self.status()

    def status(self) -> ServeStatus:
        with self._lock:
            return self._status_locked()

    def _status_locked(self) -> ServeStatus:
        child = self._child
        if child is None:
            return self._last
        code = child.proc.poll()
        if code is None:
            return ServeStatus("running" if child.ready.is_set() else "starting", child.url, child.proc.pid,
                               child.started_at, child.models, child.settings, None, child.log)
        # The child is gone: say how once, forget it, and remove the key file it no longer needs.
        if child.stopping:
            reason = "Stopped."
        elif code == 2 and _refusal(child.log):
            # The CLI's refusal (a bad project, a busy port, a folder that is not an adapter) is
            # one line that says what to do: that line, not a log dump.
            reason = f"{_refusal(child.log)} (log: {child.log})"
        else:
            when = "while serving" if child.ready.is_set() else "before it was ready"
            reason = (f"The server {_exit_words(code)} {when}. The end of its log ({child.log}):\n"
                      f"{log_tail(child.log)}")
        if child.key_file is not None:
            child.key_file.unlink(missing_ok=True)
        if child.lifeline is not None:  # the child is gone: its lifeline has no reader left
            os.close(child.lifeline)
            child.lifeline = None
        self._child = None
        self._last = ServeStatus("stopped", None, child.proc.pid, child.started_at, child.models,
                                 child.settings, reason, child.log)
        return self._last


def _ready_match(log: Path):
    """The ready line, if the child has printed it (the log is small until then: read it whole)."""
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        match = READY.match(line)
        if match:
            return match
    return None


REFUSAL = "peft-studio serve: "


def _refusal(log: Path) -> str | None:
    """The last ``peft-studio serve: <reason>`` line of the log (warnings aside), the reason only."""
    lines = [line[len(REFUSAL):].strip() for line in log_tail(log).splitlines()
             if line.startswith(REFUSAL) and not line.startswith(REFUSAL + "warning:")]
    return lines[-1] if lines else None


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # its own group: the group id is its pid
    except (ProcessLookupError, PermissionError):
        pass  # already gone


SERVER = ServeProcess()  # the app process's one serve child

_installed = threading.Lock()
_hooks: list[bool] = []


def _stop_on_exit_once() -> None:
    with _installed:
        if not _hooks:
            atexit.register(SERVER.stop)
            _hooks.append(True)


def stop_on_exit() -> None:
    """Stop the child when the app exits, whichever way. Call from the main thread (signal
    handlers can only be set there): the app's build does. A SIGTERM handler someone else set
    is kept; ours stops the child, then lets SIGTERM do what it did before."""
    _stop_on_exit_once()
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (signal.SIG_DFL, None):
        return

    def on_sigterm(signum, frame):
        SERVER.stop(grace=3.0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)


def fetch_models(status: ServeStatus, timeout: float = 5.0) -> list[dict]:
    """``GET /v1/models`` of the running server (with its key): the OpenAI list's ``data``.
    Raises ``OSError`` (urllib's errors are ones) or ``ValueError`` when it does not answer so."""
    import json
    import urllib.request

    if not status.running or not status.url:
        return []
    request = urllib.request.Request(local_url(status.url) + "/models")
    key = status.settings.api_key if status.settings else None
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = json.loads(response.read().decode("utf-8"))
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise ValueError(f"GET /v1/models answered without a model list: {str(body)[:200]}")
    return [m for m in data if isinstance(m, dict)]
