"""``peft-studio serve`` as a real child process: a project's two finished runs served under
their readable names after the one ready line, SIGTERM a clean exit 0; refusals (an exposed
host without a key, a project that does not exist, a folder that is not an adapter) are one
line on stderr and exit code 2, before any model loads."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request

import pytest

from chat_helpers import save_peft_adapter
from studio.cli import main
from studio.db import RunStatus
from studio.serve.catalog import project_catalog
from worker_helpers import new_run, tiny_spec

READY = re.compile(r"^PEFT Studio serving (\d+) models at http://127\.0\.0\.1:(\d+)/v1$")


def serve(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "studio", "serve", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ})


def test_refusals_are_one_line_and_exit_2(tmp_path, db, capsys):
    exposed = serve("--host", "0.0.0.0")  # a real child: the refusal happens before any socket
    assert exposed.returncode == 2 and "without an API key" in exposed.stderr
    assert exposed.stderr.count("\n") == 1 and exposed.stdout == ""
    empty_key = tmp_path / "key"
    empty_key.write_text("\n")
    for args, words in ((["--project", "ghost"], "no project 'ghost'"),
                        (["--adapter", f"x={tmp_path}"], "not an adapter folder"),
                        (["--adapter", "bad name=/tmp"], "the name may hold only"),
                        (["--runs", "3"], "add --project"),
                        (["--host", "0.0.0.0", "--api-key-file", str(empty_key)], "is empty")):
        assert main(["serve", *args]) == 2, args
        err = capsys.readouterr().err
        assert words in err and err.startswith("peft-studio serve: ") and err.count("\n") == 1, (args, err)


@pytest.fixture
def project(db, tiny_chat_model):
    """A project on the tiny model with two finished runs (adapters saved where a run leaves
    them), a run stopped and saved (its checkpoint is served), a failed one (not served)."""
    from studio.projects import create_project
    from studio.runs.launch import run_folder

    found = create_project(db, "serve me", model_source=str(tiny_chat_model))
    runs = []
    for index, (method, name) in enumerate([("lora", "LoRA on dates"), ("ia3", "IA3 on dates"),
                                             ("lora", "stopped"), ("lora", "broken")]):
        run = new_run(db, tiny_spec(tiny_chat_model, method=method), project="serve me")
        run = db.update_run(run.id, name=name)
        folder = run_folder(db, run)
        if name == "stopped":
            save_peft_adapter(tiny_chat_model, folder / "checkpoints" / "checkpoint-2", method, seed=index)
            db.add_checkpoint(run.id, 2, str(folder / "checkpoints" / "checkpoint-2"))
            db.update_run(run.id, status=RunStatus.CANCELLED.value)
        else:
            save_peft_adapter(tiny_chat_model, folder / "adapter", method, seed=index)
            status = RunStatus.FAILED if name == "broken" else RunStatus.COMPLETED
            db.update_run(run.id, status=status.value)
        runs.append(run)
    return found, runs


def test_a_project_catalog_names_each_finished_run(db, project):
    found, runs = project
    catalog = project_catalog(db, "serve me")
    assert list(catalog.adapters) == [f"lora-on-dates-{runs[0].id}", f"ia3-on-dates-{runs[1].id}",
                                      f"stopped-{runs[2].id}"]
    assert catalog.adapters[f"stopped-{runs[2].id}"].name == "checkpoint-2"
    assert any("broken" in note and "failed" in note for note in catalog.notes)
    assert list(project_catalog(db, found.id, f"{runs[1].id}").adapters) == [f"ia3-on-dates-{runs[1].id}"]
    with pytest.raises(ValueError, match="cannot be served: it is failed"):
        project_catalog(db, "serve me", f"{runs[3].id}")
    other = project_catalog(db, "serve me", model="default")  # another base: no run fits it
    assert other.adapters == {} and all("trained on" in note for note in other.notes[:3])
    with pytest.raises(ValueError, match="has no run 999"):
        project_catalog(db, "serve me", "999")


def test_serve_a_project_then_sigterm_exits_0(project):
    found, runs = project
    proc = subprocess.Popen([sys.executable, "-m", "studio", "serve", "--project", "serve me",
                             "--runs", f"{runs[0].id},{runs[1].id}", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ})
    try:
        line = []
        reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=90)
        assert line and READY.match(line[0].strip()), (line, proc.poll())
        count, port = READY.match(line[0].strip()).groups()
        assert count == "3"  # the base and the two runs
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as response:
            models = json.load(response)["data"]
        assert [m["id"] for m in models] == ["model", f"lora-on-dates-{runs[0].id}", f"ia3-on-dates-{runs[1].id}"]
        assert [m["method"] for m in models[1:]] == ["lora", "ia3"]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
            data=json.dumps({"model": models[2]["id"], "max_tokens": 4,
                             "messages": [{"role": "user", "content": "hi"}]}).encode(),
            headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.load(response)["usage"]["completion_tokens"] >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert proc.stdout.read() == ""  # exactly one line on stdout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
