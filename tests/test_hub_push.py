"""``peft-studio export RUN --push-to-hub REPO`` as a real CLI process: what can be checked before
the export fails at once with what to do, and nothing is exported (no row, no folder); an upload
that fails after the export keeps it and prints the ``hf upload`` line that pushes it later; the
token is never printed.

Where a hub must answer, a loopback HTTP server stands in for it (``hub``): the real hub cannot
be reached from the test machines. It answers ``whoami`` by the token it is sent (a write token,
a read-only one, a refused one) and refuses every write with 403, as the hub does for a
namespace the token may not write to.
"""

from __future__ import annotations

import base64
import gc
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from conftest import free_port, module_home

from studio.db import Database
from studio.projects import create_project
from studio.runs import launch
from studio.runspec import RunSpec
from studio.worker.train import train

WRITE, READ, REVOKED = "hf_studioTestWriteToken123", "hf_studioTestReadToken456", "hf_studioTestRevoked789"


@pytest.fixture(scope="module", autouse=True)
def studio_home(tmp_path_factory):
    yield from module_home(tmp_path_factory, "hub-push-home")


@pytest.fixture(scope="module")
def run_id(studio_home, tiny_chat_model):
    db = Database()
    project = create_project(db, "hub", model_source=str(tiny_chat_model))
    spec = RunSpec(model=str(tiny_chat_model), method="lora", sample_task="dates", max_steps=1, batch_size=2,
                   max_length=64, precision="fp32", eval_steps=0, save_steps=0, exact_match_limit=0)
    run = launch.create_run(db, project.id, spec)
    assert train(db, run.id) == "completed", db.get_run(run.id).error
    gc.collect()
    return run.id


class StandIn(BaseHTTPRequestHandler):
    """The part of the hub's HTTP API a push uses: ``whoami-v2`` by token; the model card's
    metadata check (``validate-yaml``: a YAML header with a tags list); creating a repo, the
    ``preupload`` question (every file answered "regular": sent inline with the commit) and the
    commit, under the namespace "tester"; 403 for every write under another namespace."""

    received: dict[str, dict] = {}  # repo id -> {"create": payload, "files": {path: bytes}}

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 (http.server's names)
        token = self.headers.get("authorization", "").removeprefix("Bearer ")
        if self.path.startswith("/api/whoami-v2") and token in (WRITE, READ):
            role = "write" if token == WRITE else "read"
            self._send(200, {"type": "user", "name": "tester", "auth": {"accessToken": {"role": role}}})
        elif self.path.startswith("/api/whoami-v2"):
            self._send(401, {"error": "Invalid credentials in Authorization header"})
        else:
            self._send(403, {"error": "You don't have the rights to read this repo"})

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        here = f"http://{self.headers['host']}"
        if self.path == "/api/validate-yaml":  # the card's metadata: the hub parses its YAML header
            content = json.loads(body)["content"]
            header = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else None
            ok = isinstance(header, dict) and isinstance(header.get("tags"), list)
            return self._send(200 if ok else 400, {"errors": [] if ok else [{"message": "bad metadata"}]})
        if self.path == "/api/repos/create":
            payload = json.loads(body)
            repo = f"{payload.get('organization') or 'tester'}/{payload['name']}"
            if not repo.startswith("tester/"):
                return self._send(403, {"error": "You don't have the rights to create a model under the "
                                                 f"namespace {payload.get('organization')}"})
            self.received[repo] = {"create": payload, "files": {}}
            return self._send(200, {"url": f"{here}/{repo}"})
        parts = self.path.split("/")  # /api/models/<user>/<name>/<preupload|commit>/main
        repo = "/".join(parts[3:5])
        if repo.startswith("tester/") and repo in self.received and parts[5:6] == ["preupload"]:
            files = json.loads(body)["files"]
            return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                              for f in files]})
        if repo.startswith("tester/") and repo in self.received and parts[5:6] == ["commit"]:
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    value = item["value"]
                    self.received[repo]["files"][value["path"]] = base64.b64decode(value["content"])
            return self._send(200, {"commitUrl": f"{here}/{repo}/commit/{'0' * 40}", "commitOid": "0" * 40})
        self._send(403, {"error": f"You don't have the rights to write to {repo}"})

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture(scope="module")
def hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def export(run: int, *argv: str, token: str | None = None, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m studio export RUN ARGV...`` with the hub's environment set here only: no login
    stored (a fresh HF_HOME), ``token`` as HF_TOKEN, the hub switched on unless ``env`` says."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    base.update({"HF_HOME": str(Path(os.environ["PEFT_STUDIO_HOME"]) / "hf-home"), "HF_HUB_OFFLINE": "0",
                 "HF_HUB_DISABLE_TELEMETRY": "1", **env})
    if token:
        base["HF_TOKEN"] = token
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "studio", "export", str(run), *argv], env=base,
                          capture_output=True, text=True, timeout=120)
    return done, time.monotonic() - started


def exported(run: int) -> list:
    db = Database()
    return db.list_exports(db.get_run(run).project_id)


@pytest.mark.parametrize("repo, env, token, message", [
    ("tester/my model", {}, WRITE, "'tester/my model' is not a valid repo id"),
    ("https://huggingface.co/tester/m", {}, WRITE, "takes a repo id (user/name or name), not a URL"),
    ("tester/m", {"HF_HUB_OFFLINE": "1"}, WRITE, "HF_HUB_OFFLINE is set"),
    ("tester/m", {"HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": "yes"}, WRITE, "TRANSFORMERS_OFFLINE is set"),
    ("tester/m", {}, None, "no Hugging Face token to push to tester/m: log in with `hf auth login`"),
    ("tester/m", {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}, WRITE,
     "cannot reach the hub at http://127.0.0.1:"),  # a closed loopback port: refused at once
    ("tester/m", {"HF_ENDPOINT": "HUB"}, READ, "the token can only read from the hub"),
    ("tester/m", {"HF_ENDPOINT": "HUB"}, REVOKED, "refused the token (HTTP 401"),
])
def test_what_can_be_checked_fails_at_once_and_nothing_is_exported(run_id, hub, repo, env, token, message):
    env = {k: hub if v == "HUB" else v for k, v in env.items()}
    before = len(exported(run_id))
    done, seconds = export(run_id, "--kind", "adapter", "--no-verify", "--push-to-hub", repo, token=token, **env)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert done.stderr.startswith("peft-studio export: ") and "nothing was exported" in done.stderr
    assert done.stdout == "" and len(exported(run_id)) == before  # no row, so no folder was ever written
    assert seconds < 15  # at once: no export, no long timeout (the closed port is refused)
    assert all(t not in done.stderr + done.stdout for t in (WRITE, READ, REVOKED))


def test_private_without_a_repo_is_refused(run_id):
    before = len(exported(run_id))
    done, _ = export(run_id, "--kind", "adapter", "--no-verify", "--private")
    assert done.returncode == 2 and "--private is for --push-to-hub REPO" in done.stderr
    assert len(exported(run_id)) == before


def test_an_upload_that_fails_keeps_the_export_and_says_how_to_push_it_later(run_id, hub):
    done, _ = export(run_id, "--kind", "adapter", "--no-verify", "--overwrite", "--push-to-hub",
                     "tester-org/dates-lora", token=WRITE, HF_ENDPOINT=hub)
    assert done.returncode == 2, done.stderr
    row = json.loads(done.stdout[done.stdout.index("\n{") + 1:])  # after the progress lines
    folder = Path(row["path"])
    assert row["status"] == "unverified" and "pushed_to" not in row
    assert (folder / "README.md").is_file() and (folder / "adapter_model.safetensors").is_file()
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("peft-studio export: the upload to tester-org/dates-lora") and "403" in error
    assert "create a model under the namespace tester-org" in error  # the hub's own reason, passed on
    later = f"hf upload tester-org/dates-lora {folder} . --exclude .peft-studio-export.json"
    assert f"The export is kept at {folder}; push it later with: {later}" in error
    assert exported(run_id)[0].status == "unverified" and exported(run_id)[0].path == str(folder)
    assert WRITE not in done.stderr + done.stdout


def test_a_push_uploads_the_export_folder_and_records_the_repo_url(run_id, hub):
    done, _ = export(run_id, "--kind", "adapter", "--no-verify", "--overwrite", "--push-to-hub", "tester/dates-lora",
                     "--private", token=WRITE, HF_ENDPOINT=hub)
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout[done.stdout.index("\n{") + 1:])
    assert row["pushed_to"] == f"{hub}/tester/dates-lora" == row["verification"]["hub_url"]
    sent = StandIn.received["tester/dates-lora"]
    assert sent["create"]["visibility"] == "private" and sent["create"]["type"] == "model"
    folder = Path(row["path"])
    on_disk = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != ".peft-studio-export.json"}
    assert sent["files"] == on_disk and "README.md" in sent["files"]  # the card, the weights; not our marker
    assert (folder / ".peft-studio-export.json").is_file()
    db = Database()
    assert db.list_exports(db.get_run(run_id).project_id)[0].verification["hub_url"] == row["pushed_to"]
    assert WRITE not in done.stderr + done.stdout
