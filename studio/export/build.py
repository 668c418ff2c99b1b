"""Writing an export: merged model or adapter-only files, atomically, confined, recorded.

Every export is written into a hidden sibling folder and renamed into place only after it was
written and verified, so a failure (a full disk, an unwritable folder, a failed verification)
never leaves a folder that looks good. The export row in the history says what happened.
Where it may go, and the only folders it may replace (its own earlier exports, known by their
marker), is ``target``'s job; which of a run's weights are exported (final or a checkpoint) is
``weights``'; a full disk is reported with the space the export needs.

The verification's reference outputs come from the trained model *before* anything is merged:
``merge_and_unload`` rewrites the trained model in place, and a reference taken afterwards
compared the export with itself (a check that could not fail).

An export that loads the model (merged, GGUF, a verified adapter) is refused while a run trains
on the device the export would use: it holds the whole model in fp32, and its verification a
second copy in a child process, which would take memory and cores from the training (on a
CPU-only machine, the same cores and RAM). An adapter exported without verification is a file
copy and is always allowed.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

from studio import config, models
from studio.db import Database
from studio.errors import describe, is_out_of_space
from studio.export import llamacpp
from studio.export.card import base_model_reference, model_card
from studio.export.target import (ExportError, check_destination, new_token, resolve_dest, swap_in,
                                  write_marker)
from studio.export.verify import gguf_loaders, reference_outputs, verify_export, verify_gguf
from studio.export.weights import is_training_state, pick
from studio.methods import get_method
from studio.runspec import RunSpec

DTYPES = ("float32", "bfloat16", "float16")
GGUF_TYPES = ("f16", "q8_0", *llamacpp.KQUANTS)  # the k-quants through llama.cpp's quantiser
KINDS = ("merged", "adapter", "gguf")


def exports_dir(db: Database, project_id: int) -> Path:
    project = db.get_project(project_id)
    return config.child_path(config.projects_dir(), project.folder) / "exports"


def _destination(db: Database, run: Any, kind: str, dtype: str, dest: str | None,
                 overwrite: bool, step: int | None) -> tuple[Path, bool]:
    """(the folder, whether an earlier export there is replaced); see ``target``."""
    if dest and dest.strip():  # a folder the user picked: only ever replaced if we wrote it
        target = resolve_dest(dest)
    else:
        at = "" if step is None else f"-step{step}"
        target = exports_dir(db, run.project_id) / f"{run.folder}{at}-{kind}-{dtype}"
    return target, check_destination(db, target, overwrite, run.project_id)


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
               checkpoint: int | None = None, shard_size: str = "2GB", dest: str | None = None,
               overwrite: bool = False, verify: bool = True,
               progress: Callable[[float, str], None] | None = None) -> Any:
    """Export run ``run_id``'s weights (``checkpoint``: that step's checkpoint; None: the final
    weights, else the latest checkpoint); returns the export row (status "verified",
    "unverified") or raises ``ExportError``."""
    report = progress or (lambda fraction, message: None)
    if kind not in KINDS or dtype not in (GGUF_TYPES if kind == "gguf" else DTYPES):
        raise ExportError(f"kind must be one of {KINDS}; dtype one of {DTYPES} ({GGUF_TYPES} for gguf)")
    if dtype in llamacpp.KQUANTS and not llamacpp.available():
        raise ExportError(llamacpp.kquant_refusal(dtype))
    run = db.get_run(run_id)
    if run is None:
        raise ExportError(f"there is no run {run_id} in the history {db.path}")
    spec = RunSpec.from_dict(run.spec)
    method = get_method(spec.method)
    if kind in ("merged", "gguf") and not method.mergeable:
        raise ExportError(f"{method.title} cannot be merged: {method.notes} Export the adapter only.")
    if kind == "adapter" and method.whole_model:
        raise ExportError(f"{method.title} trains the model itself: there is no adapter; export merged")
    weights = pick(db, run, checkpoint)
    from studio.export.load import load_trained  # torch: only once an export really runs

    checked = verify and (method.whole_model or method.peft_adapter)  # plain transformers/peft load it
    loads_model = kind != "adapter" or checked  # else: a file copy
    if loads_model:
        _refuse_while_training(db, method, kind)
    target, replacing = _destination(db, run, kind, dtype, dest, overwrite, weights.step)
    tmp = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
    token = new_token()  # in the row and in the folder's marker: how a later overwrite knows it is ours
    row = db.add_export(run.project_id, kind, str(target), run_id=run_id, dtype=dtype, status="writing",
                        verification={"folder_token": token, "checkpoint_step": weights.step})
    needed = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()  # an unwritable destination fails here, before the model is loaded
        trained = tokenizer = None
        if loads_model:
            report(0.1, f"Loading the trained model ({weights.label})")
            trained = load_trained(spec, weights.path, "float32", dequantize=True)
            tokenizer = models.load_tokenizer(spec.model)
        needed = _needed_bytes(trained, kind, dtype, weights.path)
        free = shutil.disk_usage(target.parent).free
        if free < needed:  # say so now, not after minutes of writing
            raise ExportError(f"not enough free space for the export in {target.parent}: it needs about "
                              f"{_size(needed)}, {_size(free)} is free. Free some space or choose another folder.")
        texts, reference, four_bit = [], [], None
        if checked:  # before writing: a merge changes ``trained`` in place
            report(0.25, "Computing the trained model's reference outputs")
            texts = _prompts(spec, tokenizer)
            reference = reference_outputs(trained, tokenizer, texts)
            if kind != "gguf":  # the GGUF check compares with ``reference`` only
                four_bit = _four_bit_reference(spec, method, weights.path, tokenizer, texts)
        report(0.4, "Writing files")
        if kind == "merged":
            _write_merged(trained, method, tokenizer, tmp, dtype, shard_size)
        elif kind == "gguf":
            from studio.export.modelfile import run_system_prompt

            gguf_file, quantiser = _write_gguf(trained, method, tokenizer, tmp, dtype, run_system_prompt(db, run))
        else:
            _copy_adapter(weights.path, tmp, spec.model)
        steps = weights.step if weights.step is not None else db.last_step(run_id)
        # The last value of each loss and eval metric up to the exported step (rows come ordered by step).
        metrics = {m.name: m.value for m in db.metrics_for(run_id)
                   if (m.name == "loss" or m.name.startswith("eval_")) and (steps is None or m.step <= steps)}
        dataset = db.get_dataset(run.dataset_id) if run.dataset_id else None
        (tmp / "README.md").write_text(model_card(run=run, spec=spec, dataset=dataset, kind=kind, dtype=dtype,
                                                  metrics=metrics, steps=steps, mergeable=method.mergeable,
                                                  peft_adapter=method.peft_adapter, checkpoint=weights.step,
                                                  modelfile=_read_modelfile(tmp) if kind == "gguf" else None),
                                       encoding="utf-8")
        result: dict[str, Any] = {"ok": None}
        if checked:
            report(0.7, "Verifying: " + ("loading the GGUF file in " + " and ".join(gguf_loaders(dtype))
                                         if kind == "gguf" else "reloading with plain transformers"))
            del trained  # the reference is computed; the child loads its own copy
            if kind == "gguf":
                result = verify_gguf(tmp, gguf_file, dtype, models.resolve_source(spec.model), reference, texts,
                                     tokenizer)
            else:
                result = verify_export(tmp, kind, models.resolve_source(spec.model), reference, texts, dtype,
                                       four_bit_reference=four_bit)
        elif verify:
            result = {"ok": None, "note": "bottleneck adapters load with the studio, not plain transformers"}
        if kind == "gguf" and quantiser:
            result["quantiser"] = quantiser
        if result.get("ok") is False:
            raise ExportError(f"verification failed: {json.dumps(result)[:1500]}")
        write_marker(tmp, export_id=row.id, project_id=run.project_id, run_id=run_id, kind=kind,
                     dtype=dtype, token=token)
        swap_in(db, tmp, target, replacing)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        error = _as_export_error(exc, target, needed)
        db.update_export(row.id, status="failed", verification={"error": str(error or exc)[:2000]})
        if error is not None:
            raise error from exc
        raise
    status = "verified" if result.get("ok") else "unverified"
    report(1.0, f"Export {status}")
    return db.update_export(row.id, status=status, size_bytes=_folder_size(target),
                            verification={**result, "folder_token": token, "checkpoint_step": weights.step})


def _refuse_while_training(db: Database, method: Any, kind: str) -> None:
    """``ExportError`` naming the run when a run trains on the device this export would load
    the model on: the CPU, or the GPU for a 4-bit (quantised) base on a GPU machine."""
    from studio.runs.launch import active_run

    busy = active_run(db)
    if busy is None:
        return
    import torch

    gpu = torch.cuda.is_available()
    if gpu and not method.quantized:  # training on the GPU, the export on the CPU: apart
        return
    raise ExportError(f"run {busy.id} ('{busy.name}') is training on this machine's "
                      f"{'GPU' if gpu else 'CPU'}; a {kind} export loads the whole model there (and its "
                      "verification a second copy), which would take memory and time from the training. "
                      "Export once it has finished, or stop it; an adapter exported without "
                      "verification is only a file copy and can be made now.")


def _four_bit_reference(spec: RunSpec, method: Any, folder: Path, tokenizer: Any, texts: list[str]) -> list | None:
    """QLoRA: the 4-bit model's logits and greedy tokens exactly as trained (``trained`` is
    de-quantised for the merge), reported beside the strict check; None for other methods."""
    if not method.quantized:
        return None
    from studio.export.load import load_trained

    as_trained = load_trained(spec, folder, "float32")
    try:
        return reference_outputs(as_trained, tokenizer, texts)
    finally:
        del as_trained


def _copy_adapter(source: Path, folder: Path, model_source: str) -> None:
    """The adapter folder as saved (PEFT's or ours), without training state (a checkpoint's
    optimizer, scheduler and RNG pickles), with the base model named portably."""
    for item in source.iterdir():
        if item.is_file() and not is_training_state(item.name) and item.name != "README.md":
            shutil.copy2(item, folder / item.name)
    config = folder / "adapter_config.json"
    if config.is_file():  # PEFT wrote the absolute path of the base it trained on
        data = json.loads(config.read_text(encoding="utf-8"))
        data["base_model_name_or_path"] = base_model_reference(model_source)[0]
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _as_export_error(exc: BaseException, target: Path, needed: int | None) -> ExportError | None:
    """A failure from the disk as one ExportError that names the folder (a full disk surfaces
    as OSError, or as safetensors' own error type); None: re-raise ``exc`` as it is."""
    if isinstance(exc, ExportError) or not isinstance(exc, Exception):
        return None
    kept = " Nothing was written there; an earlier export in that folder is untouched."
    if is_out_of_space(exc):
        need = f" The export needs about {_size(needed)};" if needed else ""
        try:
            free = f" {_size(shutil.disk_usage(target.parent).free)} is free."
        except OSError:
            free = ""
        return ExportError(f"the disk is full writing the export to {target}.{need}{free}{kept}")
    if isinstance(exc, OSError):
        return ExportError(f"cannot write the export to {target}: {describe(exc)}{kept}")
    return None


def _needed_bytes(trained: Any, kind: str, dtype: str, adapter: Path) -> int:
    """About how much the export writes: the weights at the export's precision (the merge
    drops the adapter, so parameters are counted once each; the tokenizer's few MB aside)."""
    if kind == "adapter":  # what _copy_adapter copies
        return sum(f.stat().st_size for f in adapter.iterdir() if f.is_file() and not is_training_state(f.name))
    numel = sum(p.numel() for p in trained.parameters())
    if kind == "gguf":  # an fp32 merge to convert from, then the .gguf itself (a k-quant: f16 first)
        per = {"f16": 2, "q8_0": 1.0625, "Q4_K_M": 2 + 0.6, "Q5_K_M": 2 + 0.7, "Q6_K": 2 + 0.82}
        return numel * 4 + int(numel * per[dtype])
    return numel * {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _write_gguf(trained: Any, method: Any, tokenizer: Any, folder: Path, outtype: str,
                system_prompt: str | None) -> tuple[Path, dict]:
    """Merge in fp32 into a scratch folder, convert it to one .gguf file, drop the scratch; a
    k-quant is llama.cpp's quantiser applied to an f16 file, removed afterwards. Ollama's
    Modelfile beside it names the final file. The file and what the quantiser did (empty for
    f16, q8_0)."""
    from studio.export.gguf_export import GGUFExportError, end_of_turn_token, write_gguf
    from studio.export.modelfile import write_modelfile

    scratch = folder / ".merged-fp32"
    out = folder / f"model-{outtype}.gguf"
    first = folder / ".model-f16.gguf" if outtype in llamacpp.KQUANTS else out
    _write_merged(trained, method, tokenizer, scratch, "float32", "50GB")
    try:
        write_gguf(scratch, first, "f16" if first != out else outtype, end_of_turn=end_of_turn_token(tokenizer))
        context = json.loads((scratch / "config.json").read_text(encoding="utf-8")).get("max_position_embeddings")
        shutil.rmtree(scratch, ignore_errors=True)  # before quantising: its space may be needed
        quantiser = llamacpp.quantize(first, out, outtype) if first != out else {}
        write_modelfile(folder, out.name, tokenizer, system_prompt, context_length=context)
        return out, quantiser
    except GGUFExportError as exc:
        raise ExportError(str(exc)) from exc
    except llamacpp.LlamaCppError as exc:
        raise ExportError(f"{exc} (the f16 file was written; llama.cpp could not quantise it)") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if first != out:
            first.unlink(missing_ok=True)


def _read_modelfile(folder: Path) -> str | None:
    from studio.export.modelfile import FILENAME

    path = folder / FILENAME
    return path.read_text(encoding="utf-8") if path.is_file() else None


def merged_model(trained: Any, method: Any) -> Any:
    """The plain transformers model to save: the adapter merged into the base's weights (in
    place: ``trained`` is changed), or the trained whole model itself."""
    return trained if method.whole_model else trained.merge_and_unload()


def _write_merged(trained: Any, method: Any, tokenizer: Any, folder: Path, dtype: str, shard_size: str) -> None:
    import torch

    model = merged_model(trained, method).to(getattr(torch, dtype))
    model.save_pretrained(folder, max_shard_size=shard_size)
    tokenizer.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
