"""The benchmark scripts' own logic (bench/train_speed.py, bench/gpu_check.py, bench/serve.py), without training.

Their end-to-end runs cost minutes here (``--smoke`` modes, run by hand: see the scripts'
docstrings); these tests pin what a wrong benchmark would silently get wrong: the studio side's
settings equal the reference's, the sides alternate ABBA, the ratios and goals are computed from
the right columns, and a failing or overrunning stage of the GPU check is a row, not a crash.
The serving benchmark's ``--smoke`` runs here on the tiny model (a real server child, ~10 s).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building the class
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def speed():
    return load("train_speed")


@pytest.fixture(scope="module")
def gpu():
    return load("gpu_check")


def test_studio_side_gets_the_reference_settings(speed):
    """The issue's settings, and the reference's LoRA values for every setting the studio's
    method has (none for IA3, whose parameters are not LoRA's)."""
    spec = speed.studio_spec(speed.parse_args([]))
    assert spec["method_settings"] == {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
                                       "target_preset": "all-linear"}
    assert (spec["batch_size"], spec["max_length"], spec["max_steps"], spec["learning_rate"],
            spec["lr_scheduler"], spec["seed"], spec["sample_task"]) == (8, 128, 30, 2e-4, "linear", 42,
                                                                         "dates")
    assert spec["eval_steps"] == 0 and spec["save_steps"] == 0 and spec["exact_match_limit"] == 50
    assert speed.studio_spec(speed.parse_args(["--method", "dora"]))["method_settings"]["r"] == 16
    assert speed.studio_spec(speed.parse_args(["--method", "ia3"]))["method_settings"] == {}
    smoke = speed.studio_spec(speed.parse_args(["--smoke", "--packing", "on"]))
    assert (smoke["max_steps"], smoke["exact_match_limit"], smoke["packing"]) == (2, 4, True)


def test_sides_alternate_abba(speed):
    assert speed.schedule(2) == [("reference", 1), ("studio", 1), ("studio", 2), ("reference", 2)]
    assert [side for side, _ in speed.schedule(3)][-2:] == ["reference", "studio"]


def _row(side: str, tps: float, peak: float, eval_loss: float, em: float, tokens: int = 1000) -> dict:
    return {"side": side, "tokens_per_s": tps, "tokens": tokens, "step_seconds": tokens / tps, "wall": 60.0,
            "peak_bytes": peak, "peak_kind": "RSS", "loss": eval_loss, "eval_loss": eval_loss,
            "exact_match": em, "note": ""}


def test_report_ratios_and_goals(speed):
    args = speed.parse_args([])
    ref, ours = ("reference (LoRA)", 1000 * 2**20, 0.50, 0.90), ("studio (lora)", 700 * 2**20, 0.51, 0.88)
    rows = [_row(ref[0], 200, *ref[1:]), _row(ours[0], 290, *ours[1:]), _row(ours[0], 310, *ours[1:]),
            _row(ref[0], 200, *ref[1:])]
    text = speed.report(args, rows, "machine")
    assert "studio / reference tokens/s = ×1.50" in text  # (290 + 310) / 2 over 200
    assert "round by round ×1.45, ×1.55" in text
    assert "peak RSS studio / reference = 0.70" in text
    assert "eval loss: studio 0.5100, reference 0.5000 (+2.0%)" in text
    assert "(-2 points)" in text
    assert "different numbers of training tokens" not in text
    rows[1]["tokens"] = 1200
    assert "different numbers of training tokens" in speed.report(args, rows, "machine")


def test_gpu_check_stage_failure_and_budget_are_rows(gpu):
    rows = []

    def broken():
        raise ValueError("boom")

    gpu.run_stage(rows, gpu.Budget(100), 1, "train", "lora", broken)
    gpu.run_stage(rows, gpu.Budget(0), 5, "export merged + verify", "lora", lambda: gpu.Row("x"))
    assert rows[0].status == "error: ValueError: boom"
    assert rows[1].status.startswith("skipped: time budget")
    text = gpu.table(rows, "## t")
    assert text.count("\n| ") == 3  # header and two rows: the table is whole


def test_gpu_check_ratio_only_for_allocated_memory(gpu):
    row = gpu.Row("train", "lora", peak=300 * 2**20, estimate=250 * 2**20)
    assert row.cells()[5] == "1.20"
    row.peak_label = " (RSS, cumulative)"  # the CPU: RSS is not what the estimate predicts
    assert row.cells()[5] == "–"


def test_gpu_check_names_missing_dependencies(gpu, monkeypatch, capsys):
    monkeypatch.setattr(gpu, "REQUIRED", (*gpu.REQUIRED, "no-such-package-xyz"))
    problem = gpu.check_environment(gpu.parse_args(["--device", "cpu"]))
    assert problem.startswith("missing the studio's dependencies: no-such-package-xyz")
    assert "liger-kernel" in capsys.readouterr().out  # the versions line came first


def test_serve_bench_plan_percentiles_and_goals():
    """bench/serve.py's own arithmetic: client j asks adapter j % k, nearest-rank percentiles, and
    the two goal ratios taken from the right rows (largest clients × adapters, the base's row)."""
    serve = load("serve")
    schedule = serve.plan(4, ["a", "b"], 2)
    assert [[r.model for r in client] for client in schedule] == [["a", "a"], ["b", "b"], ["a", "a"], ["b", "b"]]
    assert len({r.prompt for client in schedule for r in client}) == 8  # no two requests share a prompt
    result = serve.Result(tokens=100, wall=4.0, latencies=[float(i) for i in range(1, 21)])
    assert (result.tokens_per_s, result.percentile(50), result.percentile(95)) == (25.0, 10.0, 19.0)

    def row(clients, adapters, tps, seq_tps):
        return serve.Row(clients, adapters, serve.Result(tokens=int(tps * 10), wall=10.0),
                         serve.Result(tokens=int(seq_tps * 10), wall=10.0))

    lines = serve.goals([row(1, 1, 20, 20), row(16, 16, 90, 25), row(16, 4, 95, 25), row(16, 0, 100, 25)])
    assert lines[0].startswith("- 16 clients × 16 adapters / the same requests one at a time: ×3.60 (goal ≥ 3: met)")
    assert lines[1].startswith("- 16 clients × 16 adapters / 16 clients on the base: 0.90 (goal ≥ 0.9: met)")
    # --repeat: medians of the alternating runs (one slow base run no longer decides the ratio)
    top, base = row(16, 16, 90, 25), row(16, 0, 100, 25)
    top.again, base.again = [80.0, 95.0], [130.0, 100.0]
    lines = serve.goals([top, base])
    assert lines[1].startswith("- 16 clients × 16 adapters / 16 clients on the base: 0.90 (medians of 3 runs")
    assert "90.0/100.0 = 0.90, 80.0/130.0 = 0.62, 95.0/100.0 = 0.95" in lines[2]


def test_serve_bench_smoke_through_the_real_server(tiny_chat_model, studio_home, tmp_path, capsys):
    """The script end to end: adapters made, ``peft-studio serve`` started as a child, requests
    through HTTP, the table and goals printed, the server stopped. With ``--ignore-eos`` every
    answer runs to max_tokens (4): the server honours the field."""
    serve = load("serve")
    out = tmp_path / "serve.md"
    assert serve.main(["--smoke", "--model", str(tiny_chat_model), "--clients", "2", "--adapters", "2",
                       "--cache", str(studio_home), "--out", str(out), "--ignore-eos", "--repeat", "2"]) == 0
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| 2 |")]
    assert len(rows) == 2 and rows[1].startswith("| 2 | base | 2 | ")
    tokens = [int(r.split("|")[4]) for r in rows]
    assert tokens == [2 * 4, 2 * 4]  # usage counted: two requests of exactly max_tokens each
    assert "2 clients × 2 adapters / the same requests one at a time" in text
    assert "load average before:" in text and "after:" in text
    assert "answers that differ between concurrent and one at a time: 0" in text
    assert "(medians of 2 runs each, the two sides alternating)" in text and "run by run: " in text
