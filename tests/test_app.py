"""The app shell through its real entry points: the CLI, a served page, named API endpoints."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

import pytest

from studio.ui.launch import LaunchError, read_auth_file, resolve_auth


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "studio", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ})


def test_non_loopback_host_without_auth_exits_with_advice():
    result = run_cli("ui", "--host", "0.0.0.0", "--port", "1")
    assert result.returncode != 0
    assert "--auth user:password" in result.stderr and "--auth-file" in result.stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.5"])
def test_loopback_needs_no_auth(host):
    assert resolve_auth(host, None, None) is None


def test_non_loopback_with_auth_is_accepted(tmp_path):
    assert resolve_auth("0.0.0.0", "ada:secret", None) == [("ada", "secret")]
    auth_file = tmp_path / "logins.txt"
    auth_file.write_text("# team\nada:secret\n\nbob:pa:ss\n")
    assert resolve_auth("192.0.2.1", None, str(auth_file)) == [("ada", "secret"), ("bob", "pa:ss")]


def test_malformed_auth_file_names_file_and_line(tmp_path):
    auth_file = tmp_path / "logins.txt"
    auth_file.write_text("ada:secret\nno-colon-here\n")
    with pytest.raises(LaunchError, match=r"logins.txt, line 2: expected 'user:password'"):
        read_auth_file(auth_file)
    with pytest.raises(LaunchError, match="cannot read auth file"):
        read_auth_file(tmp_path / "missing.txt")


def test_ui_process_does_not_import_torch_at_startup():
    code = (
        "import sys; from studio.ui.app import build_app; build_app(); "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={**os.environ})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False False"


def test_served_page_and_project_endpoints(running_app, studio_home):
    from gradio_client import Client

    from studio.db import Database

    with urllib.request.urlopen(running_app, timeout=10) as response:
        assert response.status == 200
        assert "PEFT Studio" in response.read().decode()

    client = Client(running_app, verbose=False)
    client.predict("Dates demo", api_name="/create_project")
    db = Database()
    names = {p.name for p in db.list_projects()}
    assert {"My first project", "Dates demo"} <= names
    project = db.get_project_by_name("Dates demo")
    assert (studio_home / "projects" / project.folder).is_dir()

    # A duplicate name is reported, not crashed on, and nothing new is written.
    client.predict("Dates demo", api_name="/create_project")
    assert len(db.list_projects()) == 2
    summary = client.predict(api_name="/system_summary")
    assert "RAM" in summary and "Device" in summary
