"""Export "overwrite" replaces only a folder this studio exported itself (issue 12, item 2).

Before, ``--overwrite`` (the Export tab's "Replace the folder") ran ``rmtree`` on whatever folder
was named: a folder of the user's own files was emptied and the adapter written in its place,
and ``--dest /`` ended in a traceback. Every case here is a real folder on disk, a real export
and the real history; the trained run is shared by the module (one tiny LoRA run, trained in
this process with the worker's own ``train``), and the exports are adapter-only and unverified
(milliseconds), except the full-disk one, which must write a merged model to fill the limit.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import module_home

from studio import cli
from studio.db import Database
from studio.export import ExportError, export_run
from studio.projects import create_project
from studio.runspec import RunSpec
from studio.runs import launch
from studio.worker.train import train

MARKER = ".peft-studio-export.json"  # the name is part of the contract: users see the file


@pytest.fixture(scope="module", autouse=True)
def studio_home(tmp_path_factory):
    """One studio home for the module (replaces conftest's per-test home): the trained run
    lives in its history."""
    yield from module_home(tmp_path_factory, "export-overwrite-home")


@pytest.fixture(scope="module")
def run_id(studio_home, tiny_chat_model) -> int:
    db = Database()
    project = create_project(db, "exports")
    spec = RunSpec(model=str(tiny_chat_model), method="lora", sample_task="dates", max_steps=1, batch_size=2,
                   max_length=64, learning_rate=5e-3, eval_steps=0, save_steps=0, exact_match_limit=0)
    run = launch.create_run(db, project.id, spec)
    assert train(db, run.id) == "completed", db.get_run(run.id).error
    return run.id


def snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(folder.rglob("*"))}


def user_folder(tmp_path):
    folder = tmp_path / "my-work"
    (folder / "thesis").mkdir(parents=True)
    (folder / "thesis" / "chapter1.tex").write_text("months of work")
    (folder / "notes.txt").write_text("do not lose me")
    return folder


def adapter_export(run_id, dest, overwrite=True):
    return export_run(Database(), run_id, "adapter", dest=str(dest), overwrite=overwrite, verify=False)


def test_overwrite_refuses_a_folder_of_the_users_files_and_keeps_them(run_id, tmp_path):
    folder = user_folder(tmp_path)
    before = snapshot(folder)
    with pytest.raises(ExportError, match="did not write") as refused:
        adapter_export(run_id, folder)
    assert str(folder) in str(refused.value) and MARKER in str(refused.value)
    assert snapshot(folder) == before
    assert sorted(os.listdir(tmp_path)) == ["my-work"]  # no partial folder left beside it


def test_overwrite_replaces_an_earlier_export_atomically(run_id, tmp_path):
    dest = tmp_path / "exported"
    first = adapter_export(run_id, dest, overwrite=False)
    marker = json.loads((dest / MARKER).read_text())
    assert marker["export_id"] == first.id and "adapter_model.safetensors" in marker["files"]
    assert "/" not in json.dumps({k: v for k, v in marker.items() if k != "files"})  # no local paths
    with pytest.raises(ExportError, match="already exists"):  # still asks first
        adapter_export(run_id, dest, overwrite=False)
    second = adapter_export(run_id, dest)
    assert second.status == "unverified" and second.id != first.id
    assert json.loads((dest / MARKER).read_text())["export_id"] == second.id
    assert sorted(os.listdir(tmp_path)) == ["exported"]  # the old one and the partial are gone
    third = adapter_export(run_id, dest)  # the replaced folder is ours again
    assert json.loads((dest / MARKER).read_text())["export_id"] == third.id


def test_an_empty_existing_folder_is_used_without_asking(run_id, tmp_path):
    dest = tmp_path / "empty"
    dest.mkdir()
    row = adapter_export(run_id, dest, overwrite=False)
    assert (dest / "adapter_model.safetensors").is_file() and row.path == str(dest)


def _no_marker(run_id, tmp_path):
    return user_folder(tmp_path)


def _with_added_file(run_id, tmp_path):
    dest = tmp_path / "export-plus"
    adapter_export(run_id, dest, overwrite=False)
    (dest / "my-notes.md").write_text("mine")
    return dest


def _copied(run_id, tmp_path):
    adapter_export(run_id, tmp_path / "original", overwrite=False)
    return shutil.copytree(tmp_path / "original", tmp_path / "copy")


def _forged_token(run_id, tmp_path):
    dest = tmp_path / "forged"
    adapter_export(run_id, dest, overwrite=False)
    marker = json.loads((dest / MARKER).read_text())
    (dest / MARKER).write_text(json.dumps({**marker, "token": "0" * 32}))
    return dest


def _garbage_marker(run_id, tmp_path):
    folder = user_folder(tmp_path)
    (folder / MARKER).write_text("{not json")
    return folder


def _foreign_history(run_id, tmp_path):
    folder = user_folder(tmp_path)  # a marker naming an export this history never made
    (folder / MARKER).write_text(json.dumps({"export_id": 999, "project_id": 1, "token": "x", "files": []}))
    return folder


def _from_before_markers(run_id, tmp_path):
    dest = tmp_path / "old-export"  # recorded, but written before exports carried a marker
    adapter_export(run_id, dest, overwrite=False)
    (dest / MARKER).unlink()
    return dest


def _a_file(run_id, tmp_path):
    path = tmp_path / "model.bin"
    path.write_text("a file")
    return path


@pytest.mark.parametrize("make,why", [
    (_no_marker, "has no .peft-studio-export.json"),
    (_with_added_file, "files it did not write (my-notes.md)"),
    (_copied, "is a copy of export"),
    (_forged_token, "does not match export"),
    (_garbage_marker, "cannot be read"),
    (_foreign_history, "does not hold"),
    (_from_before_markers, "made by an earlier PEFT Studio"),
    (_a_file, "is a file, not a folder"),
])
def test_overwrite_refuses_every_folder_that_is_not_an_export_of_ours(run_id, tmp_path, make, why):
    dest = make(run_id, tmp_path)
    before = {p.name: snapshot(p) if p.is_dir() else p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ExportError, match=why.replace("(", r"\(").replace(")", r"\)")):
        adapter_export(run_id, dest)
    assert {p.name: snapshot(p) if p.is_dir() else p.read_bytes() for p in tmp_path.iterdir()} == before


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("dest", ["/", "~", "{tmp}/my-work", "/sys/peft-studio-export"])
def test_cli_overwrite_onto_root_home_user_or_unwritable_folder_is_one_line_and_exit_2(run_id, tmp_path, capsys,
                                                                             monkeypatch, dest):
    monkeypatch.setenv("HOME", str(user_folder(tmp_path)))  # "~": a home full of the user's files
    target = os.path.expanduser(dest.format(tmp=tmp_path))
    before = snapshot(tmp_path)
    code, err = run_cli(capsys, "export", str(run_id), "--kind", "adapter", "--dest", dest.format(tmp=tmp_path),
                        "--overwrite", "--no-verify")
    assert code == 2 and err.count("\n") == 1 and err.startswith("peft-studio export: "), err
    assert "Traceback" not in err and os.path.abspath(target) in err, err
    assert snapshot(tmp_path) == before


def test_cli_export_onto_a_full_disk_is_one_line_and_exit_2(run_id, tmp_path, capsys):
    """RLIMIT_FSIZE makes any write past 2 MB fail (EFBIG, the project's stand-in for a full
    disk) while the merged model's ~25 MB shard is written; safetensors reports it with its own
    error type, which used to escape as a traceback."""
    import resource
    import signal

    dest = tmp_path / "merged"
    previous = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 * 2**20, previous[1]))
    try:
        code, err = run_cli(capsys, "export", str(run_id), "--dest", str(dest), "--no-verify")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous)
        signal.signal(signal.SIGXFSZ, handler)
    # (stderr also carries transformers' progress bars; the error is one line of its own)
    [line] = [text for text in err.splitlines() if "peft-studio" in text]
    assert code == 2 and line.startswith("peft-studio export: ") and "Traceback" not in err, err
    assert "disk is full" in err and "needs about" in err and str(dest) in err, err
    assert os.listdir(tmp_path) == []  # no half-written export, no partial folder
