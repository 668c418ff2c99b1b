"""Exports of trained runs: merged (plain transformers reloads it, logits match), adapter-only
(PEFT or our loader reloads it), atomic on failure, recorded in the history.

Each method is trained once for the whole module (in this process, with the worker's own
``train``) and exported several ways: a training costs seconds, an export's verification a child
process, and no test here changes a trained run. The module therefore shares one studio home
(and history); the test that simulates a full disk uses its own.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

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
    # The merged weights are the de-quantised base plus the adapter: checked against that model
    # as strictly as any fp32 merge. The 4-bit model as trained (bitsandbytes' kernel rounds
    # differently) is reported beside it, not required: near-ties of a random model may flip.
    assert export.status == "verified", result
    assert result["greedy_agreement"] == 1.0 and result["loader"] == "transformers"
    assert result["max_abs_diff"] <= 1e-4
    assert 0 < result["four_bit_max_abs_diff"] < 0.1 and 0 <= result["four_bit_greedy_agreement"] <= 1
    lora = export_run(db, trained("lora"), "merged", "float32", overwrite=True).verification
    assert "four_bit_greedy_agreement" not in lora


@pytest.mark.slow
def test_lora_on_the_real_model_exports_and_verifies(smollm2_dir):
    db = Database()
    run_id = trained_run(db, smollm2_dir, "lora")
    export = export_run(db, run_id, "merged", "float32", shard_size="200MB")
    assert export.status == "verified", export.verification
    shards = [f for f in os.listdir(export.path) if f.endswith(".safetensors")]
    assert len(shards) >= 3  # 538 MB in 200 MB shards
    assert export.verification["max_abs_diff"] <= 1e-3


# GGUF exports (f16, q8_0, k-quants; transformers and llama.cpp): tests/test_llamacpp.py


# ---- issue 15: a verification that can fail, portable references, checkpoints; issue 14: training

def test_a_wrong_merge_fails_verification(trained, monkeypatch, tmp_path):
    """The reference comes from the trained (unmerged) adapter model: an export whose merge
    dropped the adapter (the base alone) differs from it and is refused. Before the fix the
    reference was computed after merge_and_unload had rewritten the trained model, so the export
    was compared with itself (max |Δlogit| exactly 0) and this wrong export was "verified"."""
    from studio.export import build

    db = Database()
    run_id = trained("lora")
    monkeypatch.setattr(build, "merged_model", lambda model, method: model.unload())  # adapter lost
    with pytest.raises(ExportError, match="verification failed") as failed:
        export_run(db, run_id, "merged", "float32", dest=str(tmp_path / "wrong-merge"))
    assert '"ok": false' in str(failed.value)
    (row,) = _failed_rows(db, run_id, tmp_path / "wrong-merge")
    assert row.status == "failed" and not (tmp_path / "wrong-merge").exists()


def test_adapter_export_names_the_base_portably(trained, tiny_chat_model, tmp_path):
    db = Database()
    # verify=False: a file copy (the adapter tests above verify adapter exports with this config)
    export = export_run(db, trained("lora"), "adapter", "float32", dest=str(tmp_path / "portable"), verify=False)
    config = json.loads((Path(export.path) / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_chat_model.name  # a local model: its name only
    for item in Path(export.path).iterdir():  # nothing points into this machine
        text = item.read_text(errors="replace") if item.suffix in (".json", ".md", ".jinja") else ""
        assert str(tiny_chat_model) not in text and os.environ["PEFT_STUDIO_HOME"] not in text, item.name
    assert not any(item.suffix in (".bin", ".pt", ".pth") for item in Path(export.path).iterdir())


def test_the_embedded_model_is_named_by_its_hub_id():
    from studio.export.card import base_model_reference, model_card

    assert base_model_reference("default") == ("HuggingFaceTB/SmolLM2-135M-Instruct", True)
    assert base_model_reference("HuggingFaceTB/SmolLM2-360M-Instruct") == ("HuggingFaceTB/SmolLM2-360M-Instruct", True)
    spec = RunSpec(model="default", method="lora", sample_task="dates")
    card = model_card(run=type("Run", (), {"name": "r"})(), spec=spec, dataset=None, kind="adapter",
                      dtype="float32", metrics={}, steps=3, mergeable=True, peft_adapter=True)
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct\n" in card
    assert "base_model: default" not in card and "| base model | HuggingFaceTB/SmolLM2-135M-Instruct |" in card


@pytest.fixture(scope="module")
def stopped_run(studio_home, tiny_chat_model):
    """A LoRA run stopped with Stop and save after its first step, through the worker's own code:
    status cancelled, a checkpoint at step 1, no final adapter folder."""
    db = Database()
    project = db.get_project_by_name("exports") or create_project(db, "exports")
    spec = RunSpec(model=str(tiny_chat_model), method="lora", sample_task="dates", max_steps=50, batch_size=2,
                   max_length=64, learning_rate=5e-3, eval_steps=0, save_steps=0, exact_match_limit=0)
    run = launch.create_run(db, project.id, spec, name="stopped")
    db.request_cancel(run.id, "save")  # seen at the end of the first step
    assert train(db, run.id) == "cancelled", db.get_run(run.id).error
    gc.collect()
    assert not (launch.run_folder(db, db.get_run(run.id)) / "adapter").exists()
    return run.id


def test_a_stopped_run_exports_its_latest_checkpoint(stopped_run):
    from studio.export.weights import exportable

    db = Database()
    run = db.get_run(stopped_run)
    assert [(w.step, w.label) for w in exportable(db, run)] == [(1, "checkpoint at step 1")]
    export = export_run(db, stopped_run, "merged", "float32")  # the default: the latest checkpoint
    assert export.status == "verified", export.verification
    assert export.verification["checkpoint_step"] == 1 and export.path.endswith("-step1-merged-float32")
    assert "checkpoint at step 1" in (Path(export.path) / "README.md").read_text()


def test_cli_export_takes_a_checkpoint_and_refuses_a_missing_one(stopped_run, capsys):
    from studio import cli

    assert cli.main(["export", str(stopped_run), "--kind", "adapter", "--checkpoint", "1", "--no-verify"]) == 0
    printed = capsys.readouterr().out  # progress lines, then the export as JSON
    out = json.loads(printed[printed.index("{"):])
    assert out["status"] == "unverified" and out["verification"]["checkpoint_step"] == 1
    files = set(os.listdir(out["path"]))  # the adapter without the checkpoint's training state
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= files
    assert not files & {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}
    assert cli.main(["export", str(stopped_run), "--checkpoint", "7"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint at step 7 (its checkpoints: 1)" in err and err.count("\n") == 1, err


def test_the_ui_exports_in_a_child_process(stopped_run):
    """The Export tab's path: ``peft-studio export`` in a child; its progress lines reach the
    callback, a refusal arrives as an ExportError with the child's one-line reason."""
    from studio.export.child import export_in_child

    seen = []
    done = export_in_child(stopped_run, "adapter", "float32", verify=False,
                           dest=str(Path(os.environ["PEFT_STUDIO_HOME"]) / "from-child"),
                           progress=lambda f, m: seen.append((f, m)))
    assert done["status"] == "unverified" and Path(done["path"]).is_dir()
    assert seen and seen[-1] == (1.0, "Export unverified"), seen
    with pytest.raises(ExportError, match="no checkpoint at step 9"):
        export_in_child(stopped_run, "merged", "float32", checkpoint=9)


@pytest.fixture
def training_elsewhere():
    """A run "training" on this machine: claimed through the same atomic claim a start uses,
    under a live process standing in for its worker; finished again afterwards."""
    import subprocess
    import sys

    db = Database()
    project = db.get_project_by_name("busy") or create_project(db, "busy")
    run = db.create_run(project.id, "the other training", "lora", {})
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    try:
        assert db.claim_run(run.id, proc.pid)[0] is not None
        yield run
    finally:
        proc.kill()
        proc.wait()
        db.update_run(run.id, status="failed")


def test_an_export_that_loads_the_model_is_refused_while_a_run_trains_on_the_cpu(trained, training_elsewhere,
                                                                                  tmp_path):
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the training runs on the GPU and a non-4-bit export on the CPU")
    db = Database()
    run_id = trained("lora")
    before = len(db.list_exports(db.get_run(run_id).project_id))
    for kind, verify in (("merged", True), ("gguf", True), ("adapter", True)):
        with pytest.raises(ExportError, match=f"run {training_elsewhere.id} \\('the other training'\\) is training"):
            export_run(db, run_id, kind, "f16" if kind == "gguf" else "float32", verify=verify)
    assert len(db.list_exports(db.get_run(run_id).project_id)) == before  # refused before any row
    # Copying the adapter's files loads no model: allowed meanwhile.
    assert export_run(db, run_id, "adapter", verify=False, dest=str(tmp_path / "copy")).status == "unverified"
