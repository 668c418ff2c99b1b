"""``peft-studio estimate`` (the JSON contract), the ArchInfo cache and the advisor."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import CONFIGS
from studio.advisor import Constraints, recommend
from studio.arch import ArchInfo
from studio.estimate import TrainSetup
from studio.models import load_config
from studio.planner import arch_for, plan

LLAMA3_8B = str(CONFIGS / "llama3-8b.json")


def estimate_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "studio", "estimate", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ})


def test_estimate_cli_prints_the_documented_json():
    result = estimate_cli("--model", LLAMA3_8B, "--method", "lora", "--set", "r=8",
                          "--set", "target_modules=q_proj,v_proj", "--batch-size", "2",
                          "--seq-len", "512", "--dtype", "bf16", "--optimizer", "adamw8bit", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    # q_proj 4096→4096 and v_proj 4096→1024 under GQA, 32 layers, r=8.
    assert out["trainable_params"] == 32 * 8 * ((4096 + 4096) + (4096 + 1024))
    assert isinstance(out["formula"], str) and "3,407,872" in out["formula"]
    assert set(out["memory_bytes"]) >= {"weights", "gradients", "optimizer", "activations", "logits"}
    assert out["total_bytes"] == sum(out["memory_bytes"].values())
    assert isinstance(out["total_bytes"], int)


@pytest.mark.parametrize("args,message", [
    (["--method", "lora", "--set", "rank=8"], "has no setting 'rank'"),
    (["--method", "galore", "--set", "rank=0"], "galore: 'rank' must be at least 1"),
    (["--method", "lora", "--set", "r"], "key=value"),
])
def test_estimate_cli_errors_are_clear(args, message):
    result = estimate_cli("--model", LLAMA3_8B, *args)
    assert result.returncode == 2 and message in result.stderr


def test_qlora_plan_quantises_the_base():
    arch = ArchInfo.from_config(load_config(LLAMA3_8B))
    qlora = plan(arch, "qlora", {}, TrainSetup())
    lora = plan(arch, "lora", {}, TrainSetup())
    assert qlora["setup"]["quant"] == "nf4"
    assert qlora["trainable_params"] == lora["trainable_params"]
    assert qlora["memory_bytes"]["weights"] < lora["memory_bytes"]["weights"] / 2.5


def test_arch_for_caches_on_disk_and_reads_no_weights(studio_home, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text((CONFIGS / "qwen2-0.5b.json").read_text())
    first = arch_for(str(folder))
    assert first.total_params == 494_032_768
    cached = list((studio_home / "projects" / "models" / "arch").glob("*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["arch"]["hidden_size"] == 896


def test_advisor_ranks_by_constraints():
    arch = ArchInfo.from_config(load_config(LLAMA3_8B))
    small_gpu = recommend(arch, Constraints(memory_bytes=12 * 2**30, must_merge=True))
    by_name = {r.method: r for r in small_gpu}
    assert small_gpu[0].method == "qlora"  # the only one that fits 12 GiB, with checkpointing
    assert small_gpu[0].verdict in ("fits", "tight") and "checkpointing" in small_gpu[0].reasons
    assert by_name["full"].verdict == "exceeds" and by_name["full"].score < by_name["qlora"].score
    assert by_name["prefix"].score < by_name["lora"].score  # cannot merge
    assert "exceeds the GPU" in by_name["full"].reasons

    quality = recommend(arch, Constraints(memory_bytes=200 * 2**30, quality_first=True))
    assert quality[0].method in ("dora", "full")
    many = {r.method: r for r in recommend(arch, Constraints(many_tasks=True, examples=200))}
    assert many["ia3"].score > many["full"].score
