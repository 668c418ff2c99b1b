"""Estimates and advice on a machine without a GPU (issue 15 item 7): a verdict against the
available RAM, no "CUDA context" on a CPU, a warning for an adapter larger than it can usefully
be, what to change when a run does not fit, an advisor whose rules fire on a CPU, the 4-bit
caveat on a CPU and prefix tuning's help agreeing with its default."""

from __future__ import annotations

import dataclasses

import pytest

from conftest import CONFIGS
from studio import fit_advice, run_setup
from studio.advisor import Constraints, recommend
from studio.estimate import TrainSetup, estimate_chat
from studio.methods import all_methods, get_method
from studio.planner import arch_for, plan
from studio.run_setup import DeviceFacts
from studio.ui import estimates
from studio.ui.draft import RunDraft

GIB = 2**30
MODEL = str(CONFIGS / "smollm2-135m.json")  # d = 576
ROOMY = DeviceFacts("cpu", None, False, False, ram_available_bytes=64 * GIB)
CRAMPED = DeviceFacts("cpu", None, False, False, ram_available_bytes=GIB // 4)


@pytest.fixture(scope="module")
def arch():
    return arch_for(MODEL)  # one child process for the module; later calls hit the memory cache


def draft(method: str = "lora", **settings) -> RunDraft:
    base = RunDraft(model=MODEL).with_method(method)
    for name, value in settings.items():
        base = base.with_setting(name, value)
    return dataclasses.replace(base, spec=dataclasses.replace(base.spec, batch_size=4, max_length=512))


def test_cpu_device_facts_read_the_available_ram():
    """Before: a CPU DeviceFacts had no memory figure at all, so every verdict was 'unknown'."""
    facts = run_setup.device_facts(MODEL)
    if facts.kind == "cuda":
        pytest.skip("this machine has a GPU")
    assert facts.free_bytes is None  # still GPU memory only: the start service never refuses a CPU run
    assert facts.ram_available_bytes and facts.ram_available_bytes > 0
    assert run_setup.memory_budget(facts) == (facts.ram_available_bytes, "RAM")


def test_train_estimate_on_a_cpu_gives_a_ram_verdict(arch):
    roomy = estimates.train_estimate(draft(), MODEL, ROOMY)
    assert "RAM" in roomy and "**fits**" in roomy and "GPU has" not in roomy, roomy
    cramped = estimates.train_estimate(draft(), MODEL, CRAMPED)
    assert "**exceeds**" in cramped and "swaps" in cramped, cramped
    # What to change, each with its figure, from the same rule as the worker's OOM advice.
    assert "To fit, change one thing" in cramped and "- gradient checkpointing on:" in cramped, cramped


def test_method_tab_verdict_names_ram_and_advises_on_a_cpu(arch):
    from studio.ui.method_tab import evaluate

    _, _, _, total = evaluate(draft(), ROOMY)
    assert "fits in 64.0 GiB of RAM" in total and "GPU" not in total.split("\n")[0], total
    _, _, _, total = evaluate(draft(), CRAMPED)
    assert "exceeds the 0.2 GiB of RAM available" in total and "To fit, change one thing" in total, total
    assert "CUDA context" not in total


def test_to_fit_lists_only_changes_that_lower_the_estimate(arch):
    spec = dataclasses.replace(draft().spec, model=MODEL)
    configured = fit_advice.alternatives(spec, CRAMPED)[0]
    rows = fit_advice.to_fit(spec, CRAMPED)
    assert rows and all(r.total_bytes < configured.total_bytes for r in rows)
    assert {"gradient checkpointing on", "QLoRA (4-bit base)"} <= {r.label for r in rows}
    assert all(r.verdict in ("fits", "tight", "exceeds") for r in rows)  # judged against the RAM


def test_chat_overhead_is_not_called_cuda_context_on_a_cpu(arch):
    cpu = {t.name: t for t in estimate_chat(arch, TrainSetup(device="cpu"), 256).terms}
    assert cpu["overhead"].bytes == 0 and "CUDA" not in cpu["overhead"].formula
    gpu = {t.name: t for t in estimate_chat(arch, TrainSetup(device="cuda"), 256).terms}
    assert "CUDA context" in gpu["overhead"].formula


def test_an_adapter_larger_than_useful_is_warned_without_method_names(arch):
    huge = plan(arch, "lora", {"r": 1024})
    assert huge["trainable_percent"] > 200 and huge["warnings"], huge["warnings"]
    text = huge["warnings"][0]
    assert "d = 576" in text and not any(m.name in text.split() or m.title in text for m in all_methods())
    assert plan(arch, "lora", {"r": 8})["warnings"] == []
    assert plan(arch, "full", {})["warnings"] == []  # the whole model is not an adapter
    shown = estimates.train_estimate(draft("lora", r=1024), MODEL, ROOMY)
    assert "**Warning:**" in shown, shown


def test_advisor_rules_fire_on_a_cpu(arch):
    """Before: 14 of 15 methods scored 0, 'no rule applies', verdict 'unknown' on a CPU."""
    setup = TrainSetup(device="cpu")
    rows = recommend(arch, Constraints(memory_bytes=64 * GIB, where="RAM"), setup)
    fitted = [r for r in rows if r.verdict == "fits"]
    assert len(fitted) >= len(rows) - 1, [(r.method, r.verdict) for r in rows]
    assert not [r for r in rows if r.reasons == "no rule applies"]
    assert all("GPU" not in r.reasons for r in rows)
    four_bit = [r for r in rows if get_method(r.method).quantized]
    assert four_bit and all("4-bit base on a CPU" in r.reasons for r in four_bit)


def test_four_bit_method_carries_a_cpu_caveat(arch):
    from importlib import metadata

    from studio.ui.method_tab import evaluate

    _, _, _, total = evaluate(draft("qlora"), ROOMY)
    assert f"bitsandbytes {metadata.version('bitsandbytes')}" in total, total
    _, _, _, total = evaluate(draft("lora"), ROOMY)
    assert "bitsandbytes" not in total


def test_prefix_projection_help_agrees_with_its_default():
    spec = get_method("prefix")
    field = next(f for f in spec.fields() if f.name == "prefix_projection")
    default = spec.params({}).prefix_projection
    assert default is False  # PEFT's PrefixTuningConfig default; counts and estimates assume it
    assert "Start with the projection on" not in spec.guidance
    assert "off by default" in spec.guidance and "off by default" in field.metadata["help"]


def test_the_start_service_never_refuses_a_cpu_run_on_the_ram_estimate(arch):
    """Swap is slow, not fatal: a CPU run whose estimate exceeds the available RAM still starts."""
    from studio.runs.start import _check_memory

    spec = dataclasses.replace(draft().spec, model=MODEL)
    assert estimates.plan_draft(draft(), MODEL, CRAMPED)[0]["verdict"] == "exceeds"
    _check_memory(spec, CRAMPED)  # raises StartRefused when it refuses
