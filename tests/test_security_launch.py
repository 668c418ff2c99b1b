"""Login options at launch (issue 12, item 3): a password on the command line is visible in
``ps``, so ``--auth USER:PASSWORD`` warns and points to ``--auth-file`` or ``--auth USER`` (asked
on the terminal); an auth file other users can read is named."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import time

import pytest

from studio.ui.launch import LaunchError, resolve_auth


def test_password_on_the_command_line_warns_and_names_the_alternatives(capsys):
    assert resolve_auth("0.0.0.0", "ada:secret", None) == [("ada", "secret")]
    err = capsys.readouterr().err
    assert "warning" in err and "ps" in err and "--auth-file" in err and "--auth USER" in err
    assert "secret" not in err


def test_auth_file_readable_by_others_is_named(tmp_path, capsys):
    logins = tmp_path / "logins.txt"
    logins.write_text("ada:secret\n")
    logins.chmod(0o644)
    resolve_auth("0.0.0.0", None, str(logins))
    assert f"chmod 600 {logins}" in capsys.readouterr().err
    logins.chmod(0o600)
    resolve_auth("0.0.0.0", None, str(logins))
    assert capsys.readouterr().err == ""


def test_user_alone_without_a_terminal_is_refused_with_advice():
    # pytest's stdin is no terminal: nothing to ask on, and no hanging on a read.
    with pytest.raises(LaunchError, match="--auth-file"):
        resolve_auth("0.0.0.0", "ada", None)


def test_user_alone_asks_for_the_password_on_the_terminal():
    """A real pseudo-terminal: the password is typed, not echoed, never in the arguments."""
    code = ("from studio.ui.launch import resolve_auth; "
            "print('RESULT', resolve_auth('0.0.0.0', 'ada', None), flush=True)")
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=follower, stdout=follower,
                            stderr=follower, start_new_session=True, env={**os.environ})
    os.close(follower)
    output = b""
    try:
        deadline = time.monotonic() + 60
        while b"Password for ada" not in output and time.monotonic() < deadline:
            output += os.read(leader, 1024)
        os.write(leader, b"typed secret\n")
        while proc.poll() is None or b"RESULT" not in output:
            try:
                chunk = os.read(leader, 1024)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
    finally:
        proc.wait(timeout=30)
        os.close(leader)
    assert "RESULT [('ada', 'typed secret')]" in output.decode()
    assert output.decode().count("typed secret") == 1  # only in the result, never echoed
