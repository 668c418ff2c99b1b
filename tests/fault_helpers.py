"""Real faults for the fault tests (test_db_faults.py, test_launch_faults.py): another process
holding the history's write lock, and a file or folder this process cannot write."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest


def hold_write_lock(path: Path) -> subprocess.Popen:
    """Another process holding the write lock (BEGIN EXCLUSIVE plus a write) until its stdin
    closes; returns once the lock is held."""
    code = ("import sqlite3, sys\n"
            f"c = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
            "c.execute('BEGIN EXCLUSIVE')\n"
            "c.execute('UPDATE projects SET notes = notes')\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def release(holder: subprocess.Popen) -> None:
    holder.stdin.close()
    holder.wait(timeout=10)
    holder.stdout.close()


def make_read_only(target: Path) -> Callable[[], None]:
    """Make ``target`` unwritable for this process, for real: chmod for a normal user; root
    ignores permission bits, so there the immutable attribute (chattr +i). Returns the undo."""
    if os.geteuid() != 0:
        mode = target.stat().st_mode
        target.chmod(0o555 if target.is_dir() else 0o444)
        return lambda: target.chmod(mode)
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(target)],
                                                         capture_output=True).returncode != 0:
        pytest.skip("running as root without a working chattr: cannot make a file read-only")
    return lambda: subprocess.run(["chattr", "-i", str(target)], check=True)
