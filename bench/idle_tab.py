"""What one idle browser tab costs: the server's (and the browser's) CPU with no run active.

    python bench/idle_tab.py [--repo DIR] [--seconds 60] [--tabs data,history]

Starts ``peft-studio ui`` from ``--repo`` (default: this checkout; point it at a ``git worktree``
of an older commit to measure "before") in a subprocess with a fresh PEFT_STUDIO_HOME holding one
project and one finished run, opens one real chromium page on it (playwright), lets it settle, then
for each tab named in ``--tabs`` opens that tab and measures over ``--seconds`` of idleness: the
server process's CPU time (psutil, user + system) as % of one core, the chromium renderer's and the
whole browser's the same way. Issue 15 item 9. (The page's polls cannot be counted here:
playwright's request events did not show Gradio 6's timer ticks; count them in the server.)
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
SETTLE_SECONDS = 15  # page load, first polls, a fast timer slowing down


def seed_history(home: Path) -> None:
    """One project with one finished run, written by this checkout's own code (same schema)."""
    os.environ["PEFT_STUDIO_HOME"] = str(home)
    sys.path.insert(0, str(ROOT))
    from studio import projects
    from studio.db import Database, RunStatus
    from studio.runs import launch
    from studio.runspec import RunSpec

    db = Database()
    project = projects.create_project(db, "Idle bench")
    run = launch.create_run(db, project.id, RunSpec(sample_task="dates", max_steps=3), name="finished")
    for step, loss in ((1, 2.0), (2, 1.5), (3, 1.2)):
        db.log_metrics(run.id, step, {"loss": loss, "learning_rate": 2e-4})
    db.update_run(run.id, status=RunStatus.COMPLETED.value)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(repo: Path, home: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PEFT_STUDIO_HOME": str(home), "PYTHONPATH": str(repo)}
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "studio", "ui", "--port", str(port)], cwd=repo, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the app exited with {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the app did not answer in 180 s; see {log_path}")


def cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for p in processes:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def chromium_processes() -> tuple[list[psutil.Process], list[psutil.Process]]:
    """(renderers, all chromium processes) started under this process."""
    every = [p for p in psutil.Process().children(recursive=True) if "chrom" in p.name().lower()]
    renderers = [p for p in every if "--type=renderer" in " ".join(p.cmdline())]
    return renderers, every


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=ROOT, help="the checkout whose app is measured")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--tabs", default="data,history", help="tabs to measure idle on, in order")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    home = Path(tempfile.mkdtemp(prefix="idle-tab-"))
    seed_history(home)
    commit = subprocess.run(["git", "-C", str(args.repo), "log", "-1", "--format=%h %s"], capture_output=True,
                            text=True).stdout.strip()[:90]
    print(f"machine: {platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}; app from {args.repo} ({commit})")
    server, url = start_server(args.repo.resolve(), home, home / "app.log")
    sp = psutil.Process(server.pid)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
            page = browser.new_page()
            page.goto(url)
            page.get_by_role("tab", name="Data").wait_for(timeout=60_000)
            for name in args.tabs.split(","):
                page.get_by_role("tab", name=name.strip().capitalize(), exact=True).click()
                time.sleep(SETTLE_SECONDS)
                renderers, every = chromium_processes()
                before = cpu_seconds([sp]), cpu_seconds(renderers), cpu_seconds(every)
                start = time.monotonic()
                time.sleep(args.seconds)
                wall = time.monotonic() - start
                after = cpu_seconds([sp]), cpu_seconds(renderers), cpu_seconds(every)
                server_pct, renderer_pct, browser_pct = (100 * (a - b) / wall for a, b in zip(after, before))
                print(f"{name} tab open, idle {wall:.0f} s: server {server_pct:.1f} % of a core, "
                      f"renderer {renderer_pct:.1f} %, browser (all processes) {browser_pct:.1f} %", flush=True)
            browser.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
