"""The memory estimate per GPU under DDP, ZeRO-2/3 and FSDP (studio/distributed/memory.py): every
term against ZeRO's Ψ formulas (Rajbhandari et al. 2020, §5.1) for one model, the totals' order,
offload as a RAM term outside the GPU total, and the Method tab's per-GPU line. Pure arithmetic:
no torch in what is tested (the ArchInfo is built once on the meta device)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from conftest import CONFIGS
from studio.arch import ArchInfo
from studio.estimate import TrainSetup, estimate_training
from studio.methods import get_method
from studio.models import load_config

N = 4


@pytest.fixture(scope="module")
def llama7b() -> ArchInfo:
    return ArchInfo.from_config(load_config(str(CONFIGS / "llama2-7b.json")))


def estimate(arch, method="full", **setup):
    spec = get_method(method)
    params = spec.params({})
    base = dict(batch_size=1, seq_len=512, dtype="bf16")
    return estimate_training(arch, method, params, spec.count(arch, params).trainable,
                             TrainSetup(**{**base, **setup}))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def test_one_process_is_the_same_estimate_whatever_the_strategy(llama7b):
    alone = estimate(llama7b).as_dict()
    for strategy in ("ddp", "fsdp", "zero2", "zero3"):
        assert estimate(llama7b, processes=1, strategy=strategy).as_dict() == alone


def test_each_term_follows_the_zero_formulas_for_a_full_fine_tune(llama7b):
    """Ψ = 6.74 B trained parameters in bf16 (W = 2), N = 4 processes."""
    alone = estimate(llama7b)
    psi, w = alone.trainable_params, 2
    assert psi == llama7b.total_params
    block = max(llama7b.block_params) * w
    outside = (llama7b.total_params - sum(llama7b.block_params)) * w

    ddp = estimate(llama7b, processes=N, strategy="ddp")
    for name, value in alone.as_dict().items():  # replicated
        assert ddp.term(name).bytes == value
    assert ddp.term("ddp_buckets").bytes == alone.gradient_bytes == psi * w  # one more gradient copy

    zero2 = estimate(llama7b, processes=N, strategy="zero2")
    assert zero2.term("weights").bytes == alone.term("weights").bytes == psi * w  # 2Ψ, replicated
    assert zero2.term("gradients").bytes == ceil_div(psi * w, N)  # 2Ψ / N
    assert zero2.term("optimizer").bytes == ceil_div(12 * psi, N)  # KΨ / N, K = 12
    assert zero2.term("activations") == alone.term("activations")
    assert zero2.term("logits") == alone.term("logits")

    zero3 = estimate(llama7b, processes=N, strategy="zero3")
    assert zero3.term("weights").bytes == ceil_div(psi * w, N)  # 2Ψ / N
    assert zero3.term("gradients").bytes == ceil_div(psi * w, N)
    assert zero3.term("optimizer").bytes == ceil_div(12 * psi, N)
    edge = max(llama7b.embedding_params, llama7b.lm_head_params) * w
    prefetch = int(0.9 * llama7b.hidden_size ** 2) * w
    assert zero3.term("gathered").bytes == max(block, edge) + prefetch

    fsdp = estimate(llama7b, processes=N, strategy="fsdp")
    assert fsdp.term("weights").bytes == ceil_div(psi * w, N)
    assert fsdp.term("gradients").bytes == ceil_div(alone.gradient_bytes, N)
    assert fsdp.term("optimizer").bytes == ceil_div(alone.term("optimizer").bytes, N)  # own dtype: bf16 states
    assert fsdp.term("gathered").bytes == outside + 2 * block
    assert "÷ 4" in fsdp.term("weights").formula and "ZeRO-3" in zero3.term("weights").formula

    # The model states of the paper's Figure 1 for this Ψ and N (weights + gradients + optimizer):
    def states(e):
        return sum(e.term(n).bytes for n in ("weights", "trainable", "gradients", "optimizer"))
    assert states(zero2) == pytest.approx(2 * psi + (2 + 12) * psi / N, rel=1e-6)
    assert states(zero3) == pytest.approx((2 + 2 + 12) * psi / N, rel=1e-6)

    totals = [e.total_bytes for e in (ddp, zero2, zero3)]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 3


def test_offload_moves_the_sharded_states_to_a_ram_term(llama7b):
    psi, w = llama7b.total_params, 2
    for strategy in ("zero2", "zero3", "fsdp"):
        kept = estimate(llama7b, processes=N, strategy=strategy)
        off = estimate(llama7b, processes=N, strategy=strategy, offload=True)
        ram = off.term("offloaded_ram")
        assert ram.host and off.total_bytes == sum(t.bytes for t in off.terms) - ram.bytes
        assert off.term("optimizer").bytes == 0 and off.total_bytes < kept.total_bytes
        assert off.term("activations") == kept.term("activations")
    z2 = estimate(llama7b, processes=N, strategy="zero2", offload=True)
    assert z2.term("offloaded_ram").bytes == ceil_div(12 * psi, N) + ceil_div(4 * psi, N)  # + fp32 grads
    assert z2.term("weights").bytes == psi * w  # ZeRO-2 offloads no parameters
    z3 = estimate(llama7b, processes=N, strategy="zero3", offload=True)
    assert z3.term("weights").bytes == 0 and z3.term("gathered").bytes > 0
    fsdp = estimate(llama7b, processes=N, strategy="fsdp", offload=True)
    kept = estimate(llama7b, processes=N, strategy="fsdp")
    moved = sum(kept.term(n).bytes for n in ("weights", "trainable", "gradients", "optimizer"))
    assert fsdp.term("offloaded_ram").bytes == moved


def test_lora_under_zero_casts_adapters_and_keeps_an_fp32_master(llama7b):
    alone = estimate(llama7b, method="lora")
    adapters = alone.trainable_params
    assert alone.term("trainable").bytes == adapters * 4  # PEFT's fp32 adapters
    zero2 = estimate(llama7b, method="lora", processes=N, strategy="zero2")
    assert zero2.term("trainable").bytes == adapters * 2
    assert zero2.term("optimizer").bytes == ceil_div((4 + 8) * adapters, N)
    fp32 = estimate(llama7b, method="lora", dtype="fp32", processes=N, strategy="zero2")
    assert fp32.term("optimizer").bytes == ceil_div(8 * adapters, N)  # no master copy in fp32
    ddp = estimate(llama7b, method="lora", processes=N, strategy="ddp")
    assert ddp.term("ddp_buckets").bytes == adapters * 4
    assert math.isclose(ddp.total_bytes - alone.total_bytes, adapters * 4)


def test_the_method_tab_shows_the_per_gpu_estimate_for_the_strategy(llama7b):
    from studio.run_setup import DeviceFacts
    from studio.runspec import RunSpec
    from studio.ui import estimates
    from studio.ui.draft import RunDraft

    if not hasattr(RunSpec(), "nproc_per_node"):
        pytest.skip("RunSpec has no nproc_per_node yet (issue 18's DDP part)")
    from studio import planner

    model = str(CONFIGS / "llama2-7b.json")
    planner._memory[model] = llama7b  # the same ArchInfo the planner's child would read (saves ~6 s)
    gpu = DeviceFacts("cuda", 80 * 2**30, True, None, 80 * 2**30)
    base = RunDraft(model=model).with_method("full")
    one, _ = estimates.plan_draft(base, model, gpu)
    spec = dataclasses.replace(base.spec, nproc_per_node=N, distributed="zero3")
    sharded = dataclasses.replace(base, spec=spec)
    four, _ = estimates.plan_draft(sharded, model, gpu)
    assert four["total_bytes"] < 0.6 * one["total_bytes"]  # states 16Ψ/4 (fp32 master) vs 8Ψ alone
    assert "gathered" in four["memory_bytes"] and "÷ 4" in four["memory_formulas"]["weights"]
    notes = estimates.fit_notes(sharded, model, gpu, four)
    assert notes[0].startswith("**Per GPU**") and "4 processes" in notes[0] and "ZeRO-3" in notes[0]
    assert not any("Per GPU" in n for n in estimates.fit_notes(base, model, gpu, one))


def test_cli_estimate_is_per_gpu_for_the_strategy(capsys):
    from studio import cli

    model = str(CONFIGS / "llama3-8b.json")
    assert cli.main(["estimate", "--model", model, "--method", "lora", "--processes", "8",
                     "--distributed", "zero3", "--offload", "--json"]) == 0
    result = __import__("json").loads(capsys.readouterr().out)
    assert result["setup"]["processes"] == 8 and result["setup"]["strategy"] == "zero3"
    assert result["memory_bytes"]["weights"] == 0 and result["memory_bytes"]["offloaded_ram"] > 0
    assert result["total_bytes"] == sum(v for k, v in result["memory_bytes"].items() if k != "offloaded_ram")
    assert cli.main(["estimate", "--model", model, "--method", "lora", "--offload"]) == 2
    assert "--offload needs --distributed fsdp, zero2 or zero3" in capsys.readouterr().err
