"""The app's serve child (``studio.serve.process``) with a real ``peft-studio serve`` process on a
tiny-model project: it starts, says it is ready, serves ``/v1/models`` over real loopback HTTP
with its key, refuses a second start, stops (process gone, port free, key file removed); a child
that fails says why; exposing without a key is refused before anything starts. The Serve tab's
snippets and tables are checked against the same running server.

One project with one finished LoRA run (recorded as a worker records it, with a real PEFT adapter
of random weights) serves the whole module.
"""

from __future__ import annotations

import os
import socket
import stat

import pytest
from conftest import module_home

from studio import projects
from studio.db import Database
from studio.runspec import RunSpec
from studio.runs import launch
from studio.serve.process import ServeProcess, ServeRefused, ServeSettings, command, fetch_models, serve_dir

KEY = "test-key-0123456789"


def served_project(db: Database, model_dir, name: str = "serve me"):
    """A project on ``model_dir`` with one completed LoRA run and its adapter on disk: (project, run)."""
    from chat_helpers import save_peft_adapter

    project = projects.create_project(db, name, model_source=str(model_dir))
    run = launch.create_run(db, project.id, RunSpec(model=str(model_dir), method="lora", sample_task="dates"),
                            name="lora on dates")
    save_peft_adapter(model_dir, launch.run_folder(db, run) / "adapter", "lora", seed=1)
    return project, db.update_run(run.id, status="completed")


@pytest.fixture(scope="module", autouse=True)
def studio_home(tmp_path_factory):
    yield from module_home(tmp_path_factory, "serve-process-home")


@pytest.fixture(scope="module")
def project(studio_home, tiny_chat_model):
    return served_project(Database(), tiny_chat_model)


@pytest.fixture(scope="module")
def server(project):
    """A real serve child with a key, on a free port; stopped at the end whatever happens."""
    proj, _ = project
    serve = ServeProcess()
    status = serve.start(ServeSettings(project=proj.id, port=0, api_key=KEY, max_active=2), timeout=180)
    try:
        yield serve, status
    finally:
        serve.stop()


def test_exposing_without_a_key_is_refused_before_anything_starts(project):
    serve = ServeProcess()
    with pytest.raises(ServeRefused, match="without an API key"):
        serve.start(ServeSettings(project=project[0].id, host="0.0.0.0", port=0))
    assert serve.status().state == "stopped" and serve.status().pid is None
    for bad, field in ((ServeSettings(project=1, port=70000), "port"), (ServeSettings(project=1, runs="1;2"), "runs"),
                       (ServeSettings(project=1, api_key=" spaced "), "API key")):
        with pytest.raises(ServeRefused, match=field):
            serve.start(bad)


def test_the_key_goes_through_a_0600_file_never_the_command_line(project):
    from studio.serve.process import write_key_file

    path = write_key_file(KEY)
    argv = command(ServeSettings(project=project[0].id, api_key=KEY), path)
    assert KEY not in " ".join(argv) and argv[argv.index("--api-key-file") + 1] == str(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == KEY


def test_start_lists_the_runs_adapter_refuses_a_second_start_and_stops(project, server):
    _, run = project
    serve, status = server
    assert status.running and status.url.startswith("http://127.0.0.1:") and status.url.endswith("/v1")
    assert status.models == 2  # the base and the run's adapter
    key_file = serve_dir() / "api-key"
    with open(f"/proc/{status.pid}/cmdline", "rb") as f:
        assert KEY.encode() not in f.read()  # what `ps` shows
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    models = fetch_models(status)
    adapters = [m for m in models if m.get("parent")]
    assert [m["id"] for m in adapters] == [f"lora-on-dates-{run.id}"], models
    assert adapters[0]["parent"] in [m["id"] for m in models if not m.get("parent")]

    # The key is really checked (the UI's fetch passes it; without it the server answers 401).
    import urllib.error
    import urllib.request
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(status.url + "/models", timeout=5)
    assert denied.value.code == 401

    # The Serve tab's view of it: what it planned to serve is what it serves, and its Python
    # snippet, run as it is shown (the official openai client), gets an answer.
    from studio.ui import serve_view

    planned, _ = serve_view.planned(Database(), project[0].id)
    assert list(planned["served name"]) == [m["id"] for m in adapters]
    curl, python, note = serve_view.snippets(status, models)
    assert f"curl {status.url}/chat/completions" in curl and KEY not in curl + python
    assert "Bearer $PEFT_STUDIO_API_KEY" in curl and "PEFT_STUDIO_API_KEY" in note
    assert f'base_url="{status.url}"' in python and f'model="{adapters[0]["id"]}"' in python
    import contextlib
    import io
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setenv("PEFT_STUDIO_API_KEY", KEY)
        exec(compile(python, "snippet", "exec"), {})
    assert printed.getvalue().strip(), "the snippet printed no answer"

    with pytest.raises(ServeRefused, match=rf"already running \(pid {status.pid}, {status.url}\)"):
        serve.start(ServeSettings(project=project[0].id, port=0))
    assert serve.status().pid == status.pid  # the refusal left the running one alone

    port = int(status.url.rsplit(":", 1)[1].split("/")[0])
    stopped = serve.stop()
    assert stopped.state == "stopped" and stopped.reason == "Stopped."
    with pytest.raises(ProcessLookupError):
        os.kill(status.pid, 0)
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(("127.0.0.1", port))  # nobody listens there any more
    with socket.socket() as sock:  # and it can be listened on again (as servers do, past TIME_WAIT)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
    assert not key_file.exists()


def test_a_child_that_fails_says_why(project):
    serve = ServeProcess()
    with pytest.raises(ServeRefused) as refused:
        serve.start(ServeSettings(project="no such project", port=0), timeout=120)
    message = str(refused.value)  # the CLI's own one-line refusal, not a log dump
    assert message.startswith("no project 'no such project' (projects: serve me)"), message
    assert serve.status().state == "stopped" and serve.status().reason == message

    # A busy port: the child refuses at once, before loading the model, and the app says so.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ServeRefused, match=r"cannot listen on 127\.0\.0\.1:\d+"):
            serve.start(ServeSettings(project=project[0].id, port=busy.getsockname()[1]), timeout=120)


def stand_in(monkeypatch, code: str):
    """Replace the serve command by a small Python child (the supervisor is what is under test
    here; the real ``peft-studio serve`` child is the one above)."""
    import sys

    from studio.serve import process

    monkeypatch.setattr(process, "command", lambda settings, key_file: [sys.executable, "-c", code])


def test_a_child_that_dies_while_serving_is_noticed_with_its_log(monkeypatch, project):
    stand_in(monkeypatch, "import sys, time; print('PEFT Studio serving 1 models at http://127.0.0.1:9/v1', "
                          "flush=True); time.sleep(0.5); print('engine exploded', file=sys.stderr); sys.exit(3)")
    serve = ServeProcess()
    status = serve.start(ServeSettings(project=1, port=0))
    assert status.running and status.url == "http://127.0.0.1:9/v1" and status.models == 1
    import time
    deadline = time.monotonic() + 20
    while serve.status().running and time.monotonic() < deadline:
        time.sleep(0.1)
    gone = serve.status()
    assert gone.state == "stopped" and "exited with code 3 while serving" in gone.reason
    assert "engine exploded" in gone.reason
    assert serve.start(ServeSettings(project=1, port=0)).running  # a dead child does not block the next start
    serve.stop()


def test_a_silent_child_times_out_and_a_stop_during_start_ends_it(monkeypatch, project):
    import threading
    import time

    stand_in(monkeypatch, "import time; time.sleep(60)")
    serve = ServeProcess()
    with pytest.raises(ServeRefused, match="did not say it was ready within 1 s"):
        serve.start(ServeSettings(project=1, port=0), timeout=1)
    assert serve.status().state == "stopped" and "within 1 s" in serve.status().reason

    threading.Timer(1.0, serve.stop).start()  # Stop clicked while the model loads
    began = time.monotonic()
    with pytest.raises(ServeRefused, match="stopped before it was ready"):
        serve.start(ServeSettings(project=1, port=0), timeout=30)
    assert time.monotonic() - began < 15 and serve.status().reason == "Stopped."


APP_STAND_IN = """
import sys, time
from studio.serve import process
process.command = lambda settings, key_file: [sys.executable, "-c",
    "import time; print('PEFT Studio serving 1 models at http://127.0.0.1:9/v1', flush=True); time.sleep(120)"]
process.stop_on_exit()  # what the Serve tab's build does on the app's main thread
print(process.SERVER.start(process.ServeSettings(project=1, port=0)).pid, flush=True)
if sys.argv[1] == "sleep":
    time.sleep(120)
"""


@pytest.mark.parametrize("how", ["SIGTERM", "normal exit"])
def test_the_child_is_stopped_when_the_app_exits(how):
    """The child has its own process group, so nothing but the app's own exit handling stops it:
    atexit on a normal exit, the SIGTERM handler when the app is terminated (SIGTERM's default
    action skips atexit)."""
    import signal
    import subprocess
    import sys
    import time

    app = subprocess.Popen([sys.executable, "-c", APP_STAND_IN, "sleep" if how == "SIGTERM" else "exit"],
                           stdout=subprocess.PIPE, text=True)
    child = int(app.stdout.readline())
    if how == "SIGTERM":
        app.send_signal(signal.SIGTERM)
    assert app.wait(timeout=30) == (-signal.SIGTERM if how == "SIGTERM" else 0)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(child, signal.SIGKILL)
    pytest.fail(f"the serve child {child} outlived the app ({how})")


def test_the_serve_tab_lists_what_it_will_serve_without_importing_torch(project):
    """The Serve tab's reads (what a project would serve, its runs, the status) in a fresh
    process, as the UI process runs them: no torch, no transformers."""
    import subprocess
    import sys

    code = ("import sys; from studio.db import Database; from studio.serve import process; "
            "from studio.ui import serve_view; "
            f"table, note = serve_view.planned(Database(), {project[0].id}); "
            f"print(list(table['served name']), serve_view.run_choices(Database(), {project[0].id})); "
            "serve_view.snippets(process.SERVER.status(), []); print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    run = project[1]
    assert out.stdout.splitlines() == [f"['lora-on-dates-{run.id}'] [('#{run.id} lora on dates', {run.id})]",
                                       "False False"], out.stdout
