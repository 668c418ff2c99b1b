"""studio.run_setup: the one RunSpec + device -> training setup translation, and the callers
that used to make their own (the worker's OOM advice estimated an fp32 GPU run as bf16)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import CONFIGS
from studio.estimate import TrainSetup
from studio.run_setup import (DeviceFacts, SetupError, cached_cpu_bf16, probe_key, training_setup)
from studio.runspec import RunSpec

GIB = 2**30
GPU = DeviceFacts("cuda", 40 * GIB, True, None, 80 * GIB)
OLD_GPU = DeviceFacts("cuda", 10 * GIB, False, None, 12 * GIB)


def cpu(verdict: bool | None) -> DeviceFacts:
    return DeviceFacts("cpu", None, False, verdict)


@pytest.mark.parametrize("requested, device, precision, dtype", [
    ("auto", GPU, "bf16", "bf16"),
    ("auto", OLD_GPU, "fp16", "fp32"),  # fp16 autocast over fp32 weights: estimated as stored
    ("fp32", GPU, "fp32", "fp32"),
    ("auto", cpu(True), "bf16", "bf16"),
    ("auto", cpu(False), "fp32", "fp32"),
    ("auto", cpu(None), "fp32", "fp32"),
    ("bf16", cpu(False), "bf16", "bf16"),
])
def test_one_precision_rule(requested, device, precision, dtype):
    spec = RunSpec(precision=requested, batch_size=3, max_length=96, optimizer="adamw8bit",
                   grad_checkpointing=True)
    choice = training_setup(spec, device)
    assert (choice.precision, choice.setup.dtype) == (precision, dtype)
    assert choice.setup == TrainSetup(batch_size=3, seq_len=96, dtype=dtype, grad_checkpointing=True,
                                      optimizer="adamw8bit", device=device.kind)
    if device.kind == "cpu" and device.cpu_bf16 is None and requested == "auto":
        assert "not measured yet" in choice.reason and "estimated as fp32" in choice.reason


def test_fp16_without_a_gpu_is_refused():
    with pytest.raises(SetupError, match="fp16 training needs a GPU"):
        training_setup(RunSpec(precision="fp16"), cpu(None))


def test_run_setup_imports_no_torch():
    code = "import sys, studio.run_setup; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_ui_reads_the_cpu_verdict_the_worker_stores(tiny_llama_dir, monkeypatch):
    """The estimate's side (no torch: the cached ArchInfo) and the worker's probe (its config)
    compute the same key, so a measured verdict reaches the estimate."""
    import torch

    from studio import sysinfo
    from studio.planner import arch_for
    from studio.worker import precision
    from studio.models import load_config

    monkeypatch.delenv(precision.PROBE_ENV)
    model, version = str(tiny_llama_dir), torch.__version__
    assert cached_cpu_bf16(model, version) is None  # never measured
    key = probe_key(arch_for(model), version, sysinfo.cpu_model())
    sysinfo.store_fact(key, {"precision": "bf16", "reason": "measured"})
    assert cached_cpu_bf16(model, version) is True
    decision = precision.decide_cpu(load_config(model))  # the worker reads it without measuring
    assert decision.cached and decision.precision == "bf16"


def test_oom_advice_and_compare_estimate_the_precision_the_run_trains_in(tmp_path):
    """Regression: an fp32 run on a GPU was advised with bf16 figures, and Compare estimated a
    running auto run as bf16 whatever the GPU."""
    from studio.planner import arch_for, plan
    from studio.worker.train import oom_advice

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text((CONFIGS / "smollm2-135m.json").read_text())
    spec = RunSpec(model=str(folder), method="dora", precision="fp32", batch_size=4, max_length=256)
    advice = oom_advice(spec, GPU)

    def figure(dtype: str, method: str = "dora", settings: dict | None = None) -> str:
        setup = TrainSetup(batch_size=4, seq_len=256, dtype=dtype, device="cuda")
        total = plan(arch_for(str(folder)), method, settings or {}, setup, GPU.free_bytes)["total_bytes"]
        return f"{total / GIB:.2f} GiB"

    assert f"- as configured: {figure('fp32')}" in advice, advice
    assert figure("fp32") != figure("bf16")
    # The 4-bit variant keeps the run's method settings (DoRA's magnitudes too).
    assert f"- QLoRA (4-bit base): {figure('fp32', 'qlora', {'use_dora': True})}" in advice, advice

    # Compare's refusal beside a running run: auto on a GPU without bf16 trains fp16 over fp32
    # weights (it was estimated as bf16).
    from studio.compare.sources import running_training_bytes

    auto = RunSpec(model=str(folder), method="dora", precision="auto", batch_size=4, max_length=256)
    fp32 = plan(arch_for(str(folder)), "dora", {}, TrainSetup(batch_size=4, seq_len=256, dtype="fp32",
                                                             device="cuda"))["total_bytes"]
    assert running_training_bytes(auto, OLD_GPU) == fp32
