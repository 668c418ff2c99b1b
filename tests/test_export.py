"""Exports of trained runs: merged (plain transformers reloads it, logits match), adapter-only
(PEFT or our loader reloads it), atomic on failure, recorded in the history.

Each method is trained once for the whole module (in this process, with the worker's own
``train``) and exported several ways: a training costs seconds, an export's verification a child
process, and no test here changes a trained run. The module therefore shares one studio home
(and history); the test that simulates a full disk uses its own.
"""

from __future__ import annotations

import gc
import os

import pytest
from conftest import module_home
import torch

from studio.db import Database
from studio.export import ExportError, export_run
from studio.projects import create_project
from studio.runspec import RunSpec
from studio.runs import launch
from studio.worker.train import train

SETTINGS = {"adalora": {"total_step": 3}, "houlsby": {"r": 8}, "qlora": {"bnb_4bit_compute_dtype": "float32"}}
MERGEABLE = ["lora", "rslora", "loraplus", "dora", "ia3", "loha", "lokr", "vera", "adalora"]


def trained_run(db: Database, model_dir, method: str, **settings) -> int:
    project = db.get_project_by_name("exports") or create_project(db, "exports")
    spec = RunSpec(model=str(model_dir), method=method, method_settings=settings, sample_task="dates",
                   max_steps=3, batch_size=2, max_length=64, learning_rate=5e-3, eval_steps=0,
                   save_steps=0, exact_match_limit=0)
    run = launch.create_run(db, project.id, spec)
    assert train(db, run.id) == "completed", db.get_run(run.id).error
    gc.collect()  # the Trainer and model hold reference cycles; free them now
    return run.id


@pytest.fixture(scope="module", autouse=True)
def studio_home(tmp_path_factory):
    """One studio home for the module (replaces conftest's per-test home): the shared trained
    runs live in its history."""
    yield from module_home(tmp_path_factory, "export-home")


@pytest.fixture(scope="module")
def trained(studio_home, tiny_chat_model):
    """``trained(method)``: the id of a completed run of ``method`` on the tiny model, trained
    on first use and shared by every later test."""
    runs: dict[str, int] = {}

    def get(method: str) -> int:
        if method not in runs:
            runs[method] = trained_run(Database(), tiny_chat_model, method, **SETTINGS.get(method, {}))
        return runs[method]
    return get


@pytest.mark.parametrize("method", MERGEABLE)
def test_merged_export_reloads_with_plain_transformers_and_matches(method, trained):
    db = Database()
    export = export_run(db, trained(method), "merged", "float32")
    result = export.verification
    assert export.status == "verified", result
    assert result["loader"] == "transformers" and result["studio_imported_by_loader"] == []
    assert result["max_abs_diff"] <= 1e-4 and result["greedy_agreement"] == 1.0
    folder = os.listdir(export.path)
    assert "config.json" in folder and "README.md" in folder and any(f.endswith(".safetensors") for f in folder)
    assert export.size_bytes > 0 and db.list_exports(db.get_run(export.run_id).project_id)[0].id == export.id


PEFT_METHODS = ["lora", "rslora", "loraplus", "dora", "ia3", "loha", "lokr", "vera", "adalora", "prompt", "prefix"]


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_adapter_export_is_a_peft_folder_that_reloads_and_matches(method, trained):
    db = Database()
    export = export_run(db, trained(method), "adapter", "float32")
    assert export.status == "verified", export.verification
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(os.listdir(export.path))
    assert export.verification["loader"] == "transformers + peft"


def test_bottleneck_adapter_export_reloads_with_our_loader(trained, tiny_chat_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from studio.adapters.bottleneck import load_bottleneck
    from studio.export.load import load_trained

    db = Database()
    run_id = trained("houlsby")
    with pytest.raises(ExportError, match="cannot be merged"):
        export_run(db, run_id, "merged")
    export = export_run(db, run_id, "adapter")
    reloaded = load_bottleneck(AutoModelForCausalLM.from_pretrained(tiny_chat_model), export.path).eval()
    model = load_trained(RunSpec.from_dict(db.get_run(run_id).spec), launch.run_folder(db, db.get_run(run_id)) / "adapter")
    ids = AutoTokenizer.from_pretrained(tiny_chat_model)("2021-03-05", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_no_overwrite_without_confirmation_and_bf16_export(trained):
    db = Database()
    run_id = trained("lora")
    first = export_run(db, run_id, "merged", "bfloat16")
    assert first.status == "verified" and first.verification["greedy_agreement"] >= 0.75
    with pytest.raises(ExportError, match="already exists"):
        export_run(db, run_id, "merged", "bfloat16")
    again = export_run(db, run_id, "merged", "bfloat16", overwrite=True)
    assert again.status == "verified"


def _failed_rows(db, run_id, path):
    return [e for e in db.list_exports(db.get_run(run_id).project_id) if e.path == str(path)]


def test_unusable_destination_leaves_nothing_marked_good(trained, tmp_path):
    db = Database()
    run_id = trained("lora")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ExportError, match="cannot write the export"):  # an OSError, named
        export_run(db, run_id, "merged", dest=str(blocker / "out"))
    assert blocker.read_text() == "not a folder"
    (row,) = _failed_rows(db, run_id, blocker / "out")
    assert row.status == "failed" and row.verification["error"]


def test_disk_full_mid_write_leaves_no_half_written_folder(tiny_chat_model, tmp_path, monkeypatch):
    """RLIMIT_FSIZE makes any write past 2 MB fail with EFBIG, like a full disk, while the
    model's safetensors shard (~25 MB) is being written. In a fresh home of its own: the limit
    applies to every file this process writes, the history's SQLite files included, and the
    module's shared history may well be past 2 MB by now."""
    import resource
    import signal

    monkeypatch.setenv("PEFT_STUDIO_HOME", str(tmp_path / "own-home"))
    db = Database()
    run_id = trained_run(db, tiny_chat_model, "lora")
    dest = tmp_path / "exports" / "merged"
    dest.parent.mkdir()
    previous = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 * 2**20, previous[1]))
    try:
        with pytest.raises(Exception):
            export_run(db, run_id, "merged", dest=str(dest))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous)
        signal.signal(signal.SIGXFSZ, handler)
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    (row,) = _failed_rows(db, run_id, dest)
    assert row.status == "failed"


def test_qlora_merges_into_the_dequantised_base(trained):
    pytest.importorskip("bitsandbytes")
    db = Database()
    run_id = trained("qlora")
    export = export_run(db, run_id, "merged", "float32")
    result = export.verification
    # Compared with the 4-bit model as trained: the merged weights are its de-quantised weights
    # plus the adapter, so the greedy outputs agree on every eval prompt.
    assert export.status == "verified", result
    assert result["greedy_agreement"] == 1.0 and result["loader"] == "transformers"


@pytest.mark.slow
def test_lora_on_the_real_model_exports_and_verifies(smollm2_dir):
    db = Database()
    run_id = trained_run(db, smollm2_dir, "lora")
    export = export_run(db, run_id, "merged", "float32", shard_size="200MB")
    assert export.status == "verified", export.verification
    shards = [f for f in os.listdir(export.path) if f.endswith(".safetensors")]
    assert len(shards) >= 3  # 538 MB in 200 MB shards
    assert export.verification["max_abs_diff"] <= 1e-3


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_gguf_export_reloads_with_transformers_and_agrees(outtype, trained):
    db = Database()
    export = export_run(db, trained("lora"), "gguf", outtype)
    assert export.status == "verified", export.verification
    files = set(os.listdir(export.path))
    assert f"model-{outtype}.gguf" in files and "README.md" in files and ".merged-fp32" not in files
    assert export.verification["greedy_agreement"] >= 0.75 and export.verification["studio_imported_by_loader"] == []
