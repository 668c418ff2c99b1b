"""Which adapters the Compare tab offers for a project (``compare.sources.project_adapters``),
on a real history and real folders: a completed run's final adapter and its earlier checkpoints,
its last step's checkpoint (the final adapter's weights) listed once; a run stopped and saved
offers every checkpoint, its last one included; a running run nothing."""

from __future__ import annotations

from pathlib import Path

from studio.compare.sources import project_adapters
from studio.db import Database, RunStatus


def _adapter(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return folder


def _run(db: Database, project_id: int, root: Path, name: str, status: RunStatus, steps: list[int],
         final: bool) -> int:
    run = db.create_run(project_id, name, "lora", {"method": "lora"}, status=status)
    folder = root / name
    db.update_run(run.id, folder=str(folder))
    if final:
        _adapter(folder / "adapter")
    for step in steps:
        db.log_metrics(run.id, step, {"loss": 1.0 / step})
        db.add_checkpoint(run.id, step, _adapter(folder / "checkpoints" / f"checkpoint-{step}"))
    return run.id


def test_a_completed_runs_last_checkpoint_is_its_final_adapter_listed_once(tmp_path):
    db = Database()
    project = db.create_project("sources")
    done = _run(db, project.id, tmp_path, "done", RunStatus.COMPLETED, [2, 4], final=True)
    stopped = _run(db, project.id, tmp_path, "stopped", RunStatus.CANCELLED, [3, 6], final=False)
    _run(db, project.id, tmp_path, "busy", RunStatus.RUNNING, [2], final=False)
    sources = project_adapters(db, project.id, lambda run: Path(run.folder))
    listed = sorted((s.run_id, s.step or 0) for s in sources)
    assert listed == [(done, 0), (done, 2), (stopped, 3), (stopped, 6)], listed
    assert len({s.label for s in sources}) == len(sources)
