"""Shared fixtures: an isolated studio home per test, family configs, the real 135M model
(converted once per session, optionally pre-cached in a test's home), and one real-model LoRA
run per session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ASSETS = Path(__file__).parent / "assets"
CONFIGS = ASSETS / "configs"


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``launcher.py --test`` runs two workers with ``--dist loadgroup``):
    a test file's tests stay on one worker (its module-scoped fixtures are built once), the real
    model's tests share one worker (its session fixtures convert and train it once) and the
    browser tests another (two chromiums at once on two cores would only wait on each other)."""
    if not config.pluginmanager.hasplugin("xdist") or not getattr(config.option, "numprocesses", None):
        return
    for item in items:
        if item.get_closest_marker("e2e"):
            group = "browser"
        elif item.get_closest_marker("slow"):
            group = "real-model"
        else:
            group = item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(autouse=True)
def studio_home(tmp_path, monkeypatch):
    """Every test works in its own PEFT_STUDIO_HOME: nothing touches the real projects/."""
    home = tmp_path / "studio-home"
    home.mkdir()
    monkeypatch.setenv("PEFT_STUDIO_HOME", str(home))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # precision "auto" on the CPU would time a bf16 probe in every fresh home (and may pick bf16):
    # the suite keeps fp32 unless a test asks (test_precision.py runs the real probe).
    monkeypatch.setenv("PEFT_STUDIO_PRECISION_PROBE", "fp32")
    yield home
    _reap_workers(home)


def module_home(tmp_path_factory, name: str):
    """A studio home shared by a whole module (for a module-scoped, autouse ``studio_home`` that
    replaces the per-test one: trained runs then live in one history), with the same
    environment as ``studio_home``. Use as ``yield from module_home(tmp_path_factory, name)``."""
    home = tmp_path_factory.mktemp(name)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PEFT_STUDIO_HOME", str(home))
        patch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield home


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures(...)``):
    their matmuls are tiny, and on a busy 2-core machine two threads spin-wait on each other
    (measured: LAPACK's 64×64 SVD 1000× slower, 20 tiny training steps 26 s against 1.2 s)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def db(studio_home):
    """This test's history (a real SQLite file in its home). Runs it queued or started are
    stopped at the end (``queue_helpers.stop_everything``), then it is closed. Modules that
    need another setup define their own ``db``."""
    from queue_helpers import stop_everything
    from studio.db import Database

    database = Database()
    yield database
    stop_everything(database)
    database.close()


def _reap_workers(home: Path) -> None:
    """Kill worker processes still running for this test's home. A test that fails or times out
    mid-training would otherwise leave its worker (its own session, see launch.start) training
    for minutes beside the tests that follow, slowing them all down."""
    import os
    import signal

    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "studio.worker" not in " ".join(proc.info["cmdline"] or []):
                continue
            group = os.getpgid(proc.pid)
            if proc.environ().get("PEFT_STUDIO_HOME") == str(home) and group != os.getpgrp():
                os.killpg(group, signal.SIGKILL)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue  # gone meanwhile, or not ours to inspect


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The embedded model converted once per test session (about 20 s)."""
    from studio.models import convert_gguf, embedded_gguf_path

    dest = tmp_path_factory.mktemp("smollm2") / "model"
    return convert_gguf(embedded_gguf_path(), dest)


@pytest.fixture
def default_model_cached(studio_home, smollm2_dir) -> Path:
    """The test's studio home with the embedded model already converted (hard links to the
    session's copy), for tests about something else than the conversion: it costs ~20 s per
    home, and test_models.py tests it."""
    import os
    import shutil

    from studio.models import embedded_gguf_path, gguf_cache_dir

    dest = gguf_cache_dir(embedded_gguf_path(), embedded=True)
    dest.mkdir(parents=True)
    for item in smollm2_dir.iterdir():  # flat: config, tokenizer, weights, the cache marker
        try:
            os.link(item, dest / item.name)
        except OSError:  # another file system
            shutil.copy2(item, dest / item.name)
    return dest


# The real-model LoRA run of the first-run demo path (test_train_lift.py). A session fixture so
# that later tests needing a trained real model can share it instead of training their own.
LIFT_TASK, LIFT_LIMIT = "dates", 20


@pytest.fixture(scope="session")
def smollm2_lora_run(tmp_path_factory, smollm2_dir) -> tuple[Path, int]:
    """LoRA on the real SmolLM2-135M through a real worker process, with the first-run demo's
    settings sized for a CPU, in a studio home of its own. Returns (home, run id); a test
    reads it with ``monkeypatch.setenv("PEFT_STUDIO_HOME", str(home))``. Nothing may change
    the run: every test that uses it sees the run as trained."""
    import os
    import signal
    import time

    from studio.db import Database
    from studio.projects import create_project
    from studio.runspec import RunSpec
    from studio.runs import launch

    home = tmp_path_factory.mktemp("smollm2-lora-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PEFT_STUDIO_HOME", str(home))  # the worker inherits it
        db = Database()
        project = create_project(db, "lift")
        # Half the demo's 60 steps: measured, 30 lift exact match from 5 % to 90 % (65 % after
        # 10), a wide margin over the test's bar of +30 points, at half the CPU time.
        spec = RunSpec(model=str(smollm2_dir), method="lora", sample_task=LIFT_TASK, max_steps=30,
                       batch_size=4, max_length=96, learning_rate=2e-4, eval_steps=0, save_steps=0,
                       exact_match_limit=LIFT_LIMIT)
        run = launch.create_run(db, project.id, spec)
        launch.start(db, run.id)
        deadline = time.monotonic() + 1500
        try:
            while db.get_run(run.id).status == "running" and time.monotonic() < deadline:
                time.sleep(1)
                launch.reconcile(db)
        finally:  # never leave a real-model training behind
            pid = db.get_run(run.id).pid
            if db.get_run(run.id).status == "running" and pid:
                os.killpg(pid, signal.SIGKILL)
    return home, run.id


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, proc, timeout: float = 90.0) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def start_app(log_path: Path):
    """``peft-studio ui`` as a real child process on a free loopback port, its output appended
    to ``log_path``: (process, URL, log file) once it answers."""
    import os
    import subprocess
    import sys

    port = free_port()
    log = open(log_path, "a")
    proc = subprocess.Popen([sys.executable, "-m", "studio", "ui", "--port", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ}, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_http(url, proc)
    except BaseException:
        stop_app(proc, log)
        raise
    return proc, url, log


def stop_app(proc, log) -> None:
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture
def running_app(studio_home, tmp_path):
    """The app as a real child process (``start_app``); yields its URL."""
    proc, url, log = start_app(tmp_path / "app.log")
    try:
        yield url
    finally:
        stop_app(proc, log)


TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=512)


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY_LLAMA, **overrides})


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Llama saved as a model folder (weights + tokenizer-free)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    AutoModelForCausalLM.from_config(tiny_llama_config()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    """A random 2-layer Llama with the real SmolLM2 tokenizer and chat template: trains in
    seconds through the whole studio path (worker, Trainer, checkpoints, exact match)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from studio.models import tokenizer_folder

    folder = tmp_path_factory.mktemp("tiny-chat") / "model"
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder("default")))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    model.generation_config.max_new_tokens = 8
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def sleeper():
    """A live process standing in for another run's worker (its own session, like a worker)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()
