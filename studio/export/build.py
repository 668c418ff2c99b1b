"""Writing an export: merged model or adapter-only files, atomically, confined, recorded.

Every export is written into a hidden sibling folder and renamed into place only after it was
written and verified, so a failure (a full disk, an unwritable folder, a failed verification)
never leaves a folder that looks good. The export row in the history says what happened.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

from studio import config, models
from studio.db import Database, RunStatus
from studio.export.card import model_card
from studio.export.load import WHOLE_MODEL_METHODS, load_trained
from studio.export.verify import reference_outputs, verify_export
from studio.methods import get_method
from studio.runspec import RunSpec

DTYPES = ("float32", "bfloat16", "float16")
GGUF_TYPES = ("f16", "q8_0")
KINDS = ("merged", "adapter", "gguf")


class ExportError(Exception):
    """An export that cannot be made, with the reason a user can act on."""


def exports_dir(db: Database, project_id: int) -> Path:
    project = db.get_project(project_id)
    return config.child_path(config.projects_dir(), project.folder) / "exports"


def _destination(db: Database, run: Any, kind: str, dtype: str, dest: str | None, overwrite: bool) -> Path:
    if dest:  # a folder the user picked explicitly: taken as given, but never over a file
        target = Path(dest).expanduser().resolve()
    else:
        target = exports_dir(db, run.project_id) / f"{run.folder}-{kind}-{dtype}"
    if target.exists() and not overwrite:
        raise ExportError(f"{target} already exists; confirm overwrite to replace it")
    if target.exists() and not target.is_dir():
        raise ExportError(f"{target} is a file, not a folder")
    return target


def _prompts(spec: RunSpec, tokenizer: Any, limit: int = 4) -> list[str]:
    """A few eval prompts rendered through the chat template (the run's sample task if any)."""
    if spec.sample_task:
        from studio.samples import get_task, load_rows, prompt_text

        questions = [prompt_text(r) for r in load_rows(get_task(spec.sample_task), "eval")[:limit]]
    else:
        questions = ["What is the capital of France?", "Write one sentence about the sea.",
                     "List three colours.", "Explain what a function is."][:limit]
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                          add_generation_prompt=True) for q in questions]


def _folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def export_run(db: Database, run_id: int, kind: str = "merged", dtype: str = "float32", *,
               shard_size: str = "2GB", dest: str | None = None, overwrite: bool = False,
               verify: bool = True, progress: Callable[[float, str], None] | None = None) -> Any:
    """Export run ``run_id``; returns the export row (status "verified", "unverified" or raises)."""
    report = progress or (lambda fraction, message: None)
    if kind not in KINDS or dtype not in (GGUF_TYPES if kind == "gguf" else DTYPES):
        raise ExportError(f"kind must be one of {KINDS}; dtype one of {DTYPES} ({GGUF_TYPES} for gguf)")
    run = db.get_run(run_id)
    if run is None or run.status != RunStatus.COMPLETED.value:
        raise ExportError(f"run {run_id} has not completed; export a finished run")
    spec = RunSpec.from_dict(run.spec)
    method = get_method(spec.method)
    if kind in ("merged", "gguf") and not method.mergeable:
        raise ExportError(f"{method.title} cannot be merged: {method.notes} Export the adapter only.")
    if kind == "adapter" and spec.method in WHOLE_MODEL_METHODS:
        raise ExportError(f"{method.title} trains the model itself: there is no adapter; export merged")
    from studio.worker.launch import run_folder

    adapter = run_folder(db, run) / "adapter"
    if not adapter.is_dir():
        raise ExportError(f"{adapter} is missing: the run's trained weights are gone")
    target = _destination(db, run, kind, dtype, dest, overwrite)
    tmp = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
    row = db.add_export(run.project_id, kind, str(target), run_id=run_id, dtype=dtype, status="writing")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        report(0.1, "Loading the trained model")
        trained = load_trained(spec, adapter, "float32", dequantize=True)
        tokenizer = models.load_tokenizer(spec.model)
        tmp.mkdir(parents=True)
        report(0.4, "Writing files")
        if kind == "merged":
            _write_merged(trained, spec, tokenizer, tmp, dtype, shard_size)
        elif kind == "gguf":
            _write_gguf(trained, spec, tokenizer, tmp, dtype)
        else:
            for item in adapter.iterdir():  # the PEFT (or bottleneck) folder as saved
                if item.is_file() and not item.name.startswith("training_args"):
                    shutil.copy2(item, tmp / item.name)
        # The last value of each loss and eval metric (rows come ordered by step).
        metrics = {m.name: m.value for m in db.metrics_for(run_id) if m.name == "loss" or m.name.startswith("eval_")}
        dataset = db.get_dataset(run.dataset_id) if run.dataset_id else None
        (tmp / "README.md").write_text(model_card(run=run, spec=spec, dataset=dataset, kind=kind, dtype=dtype,
                                                  metrics=metrics, steps=db.last_step(run_id),
                                                  mergeable=method.mergeable), encoding="utf-8")
        result: dict[str, Any] = {"ok": None}
        if verify and spec.method != "houlsby":
            report(0.7, "Verifying: reloading with plain transformers")
            if method.quantized:
                trained = load_trained(spec, adapter, "float32")  # compare with the 4-bit model as trained
            texts = _prompts(spec, tokenizer)
            reference = reference_outputs(trained, tokenizer, texts)
            result = verify_export(tmp, kind, models.resolve_source(spec.model), reference, texts, dtype,
                                   quantised_reference=method.quantized)
        elif verify:
            result = {"ok": None, "note": "bottleneck adapters load with the studio, not plain transformers"}
        if result.get("ok") is False:
            raise ExportError(f"verification failed: {json.dumps(result)[:1500]}")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        db.update_export(row.id, status="failed", verification={"error": str(exc)[:2000]})
        raise
    status = "verified" if result.get("ok") else "unverified"
    report(1.0, f"Export {status}")
    return db.update_export(row.id, status=status, verification=result, size_bytes=_folder_size(target))


def _write_gguf(trained: Any, spec: RunSpec, tokenizer: Any, folder: Path, outtype: str) -> None:
    """Merge in fp32 into a scratch folder, convert it to one .gguf file, drop the scratch."""
    from studio.export.gguf_export import GGUFExportError, write_gguf

    scratch = folder / ".merged-fp32"
    _write_merged(trained, spec, tokenizer, scratch, "float32", "50GB")
    try:
        write_gguf(scratch, folder / f"model-{outtype}.gguf", outtype)
    except GGUFExportError as exc:
        raise ExportError(str(exc)) from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _write_merged(trained: Any, spec: RunSpec, tokenizer: Any, folder: Path, dtype: str, shard_size: str) -> None:
    import torch

    model = trained if spec.method in WHOLE_MODEL_METHODS else trained.merge_and_unload()
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(folder, max_shard_size=shard_size)
    tokenizer.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
