"""The Export tab: pick a run and which of its trained weights (the final ones, or a checkpoint of a
run that was stopped and saved), export them merged or adapter-only, see the verification, and
the project's exports with their paths, sizes and results; below them, the "Combine adapters"
section (``compose_panel``), whose result this tab lists and picks at once.

The export itself runs in a child process (``studio.export.child``): the UI process never loads
a model or imports torch, and a long merge cannot hold up the other tabs. What may be exported
comes from ``studio.export.weights``; the refusals (a run training on the same device, a method
that does not merge) come from ``export_run`` in the child, shown as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from studio.adapters import derived
from studio.db import Database
from studio.export import llamacpp
from studio.export.weights import exportable
from studio.methods import get_method
from studio.runspec import RunSpec
from studio.ui import compose_panel, labels

TEXT = labels.EXPORT


@dataclass
class ExportHandles:
    run: gr.Dropdown
    weights: gr.Dropdown


def run_choices(db: Database, project_id: int | None) -> list[tuple[str, int]]:
    """The project's runs that have trained weights on disk (final or a checkpoint), newest first."""
    if project_id is None:
        return []
    return [(f"#{r.id} {r.name} ({r.method}, {'combined' if derived.is_derived(r) else r.status})", r.id)
            for r in db.list_runs(project_id) if exportable(db, r)]


def weight_choices(db: Database, run_id: int | None) -> list[tuple[str, str]]:
    """(label, value) per exportable weights of the run; the value is the checkpoint's step, or
    "final". The first is the default: the final weights when there are some, else the latest
    checkpoint."""
    run = db.get_run(run_id) if run_id is not None else None
    if run is None:
        return []
    return [(w.label, "final" if w.step is None else str(w.step)) for w in exportable(db, run)]


def _exports_table(db: Database, project_id: int | None) -> pd.DataFrame:
    rows = []
    for e in db.list_exports(project_id) if project_id is not None else []:
        v = e.verification or {}
        rows.append({"id": e.id, "run": e.run_id, "step": v.get("checkpoint_step"), "kind": e.kind,
                     "dtype": e.dtype, "status": e.status, "size MiB": round((e.size_bytes or 0) / 2**20, 1),
                     "max |Δlogit|": v.get("max_abs_diff"), "greedy agree": v.get("greedy_agreement"),
                     "path": e.path})
    return pd.DataFrame(rows, columns=["id", "run", "step", "kind", "dtype", "status", "size MiB",
                                       "max |Δlogit|", "greedy agree", "path"])


def run_note(db: Database, run_id: int | None) -> str:
    if run_id is None:
        return TEXT["nothing"]
    method = get_method(RunSpec.from_dict(db.get_run(run_id).spec).method)
    if not method.mergeable:
        return TEXT["no_merge"].format(title=method.title, notes=method.notes)
    if method.quantized:
        return TEXT["qlora"]
    return TEXT["merges"].format(title=method.title)


def export_message(result: dict) -> str:
    """What the user reads after an export (``result``: the export as the child reports it); a
    GGUF export also says what llama.cpp found, or what was not verified without it."""
    v = result.get("verification") or {}
    checked = (TEXT["checked"].format(diff=v["max_abs_diff"], agree=v["greedy_agreement"], prompts=v["prompts"],
                                      loader=v["loader"]) if "max_abs_diff" in v else v.get("note", ""))
    lc = v.get("llama_cpp") or {}
    if "greedy_agreement" in lc:
        ending = lc["answers_ending_at_end_of_turn"]
        stop = (TEXT["llamacpp_stopped"].format(stopped=lc["stopped_there"], ending=ending) if ending else
                TEXT["llamacpp_no_end"].format(eog="yes" if all(lc["end_ids_are_end_of_generation"].values())
                                               else "no"))
        ties = lc.get("near_ties") or []
        tied = TEXT["llamacpp_ties"].format(n=len(ties), margin=max(t["margin"] for t in ties)) if ties else ""
        checked = "; ".join(filter(None, [checked, TEXT["llamacpp_checked"].format(
            agree=lc["greedy_agreement"], prompts=lc["prompts"], ties=tied, required=lc["required"], stop=stop)]))
    elif lc.get("error"):
        checked = f"{checked}; llama.cpp: {lc['error']}"
    if v.get("not_verified"):
        checked = f"{checked}. {v['not_verified']}"
    if (v.get("quantiser") or {}).get("note"):
        checked = f"{checked}. llama.cpp's quantiser: {v['quantiser']['note']}"
    step = v.get("checkpoint_step")
    weights = "final weights" if step is None else f"checkpoint at step {step}"
    return TEXT["done"].format(status=result["status"], path=result["path"],
                               mb=(result.get("size_bytes") or 0) / 2**20, weights=weights, checked=checked)


def ollama_hint(path: str, run_name: str) -> str:
    """The two Ollama commands for a GGUF export folder holding a Modelfile ('' otherwise)."""
    from studio.export.modelfile import FILENAME, ollama_name

    if not (Path(path) / FILENAME).is_file():
        return ""
    return TEXT["ollama"].format(path=path, name=ollama_name(run_name))


def build(demo: gr.Blocks, db: Database, picker: gr.Dropdown, tab: gr.Tab | None = None) -> ExportHandles:
    """Render the tab. ``tab``: the tab itself; opening it re-lists the runs (one may have
    finished, or been stopped, in the Train tab since the page loaded)."""
    with gr.Row():
        with gr.Column(scale=2):
            run = gr.Dropdown(label=TEXT["run"], choices=[], elem_id="export-run")
            weights = gr.Dropdown(label=TEXT["weights"], info=TEXT["weights_help"], choices=[],
                                  elem_id="export-weights")
            note = gr.Markdown(elem_id="export-note")
            kind = gr.Radio(["merged", "adapter", "gguf"], value="merged", label="What to export",
                            info="merged: a full model plain transformers loads; adapter: small PEFT files; "
                                 "gguf: one file for llama.cpp-style runtimes (Llama-family models)")
            dtype = gr.Radio(["float32", "bfloat16", "float16"], value="float32", label="Precision")
            with gr.Accordion("More", open=False):
                shard = gr.Textbox(value="2GB", label="Largest safetensors shard")
                dest = gr.Textbox(label="Folder (empty: the project's exports folder)")
                overwrite = gr.Checkbox(False, label="Replace an earlier export in this folder",
                                        info="Only a folder PEFT Studio exported itself (it carries a "
                                             ".peft-studio-export.json marker) is ever replaced; a folder "
                                             "holding any other files is refused and left as it is. An "
                                             "empty folder is used without asking.")
                verify = gr.Checkbox(True, label="Verify by reloading and comparing (recommended)")
            go = gr.Button("Export", variant="primary", elem_id="export-go")
            result = gr.Markdown(elem_id="export-result")
        with gr.Column(scale=3):
            table = gr.Dataframe(label="Exports of this project", interactive=False, elem_id="export-table",
                                 wrap=True)
    combined = compose_panel.build(db, picker, tab, load=demo)

    def pick_weights(run_id, current=None):
        choices = weight_choices(db, run_id)
        values = [c[1] for c in choices]
        return gr.update(choices=choices, value=current if current in values else (values[0] if values else None))

    def refresh(project_id, current=None, current_weights=None):
        choices = run_choices(db, project_id)
        ids = [c[1] for c in choices]
        value = current if current in ids else (ids[0] if ids else None)
        return (gr.update(choices=choices, value=value), pick_weights(value, current_weights),
                run_note(db, value), _exports_table(db, project_id))

    def on_export(project_id, run_id, weights_v, kind_v, dtype_v, shard_v, dest_v, overwrite_v, verify_v,
                  progress=gr.Progress()):
        from studio.export.child import export_in_child
        from studio.export.target import ExportError

        if run_id is None:
            return TEXT["pick"], _exports_table(db, project_id)
        step = None if weights_v in (None, "", "final") else int(weights_v)
        try:
            done = export_in_child(run_id, kind_v, dtype_v, checkpoint=step, shard_size=shard_v or "2GB",
                                   dest=dest_v or None, overwrite=overwrite_v, verify=verify_v,
                                   progress=lambda f, m: progress(f, desc=m))
        except (ExportError, OSError) as exc:
            return TEXT["failed"].format(reason=exc), _exports_table(db, project_id)
        run = db.get_run(run_id)
        return (export_message(done) + ollama_hint(done["path"], run.name if run else "model"),
                _exports_table(db, project_id))

    def on_kind(kind_v):
        if kind_v != "gguf":
            return gr.update(choices=["float32", "bfloat16", "float16"], value="float32", info=None)
        # k-quants are offered without llama.cpp too: choosing one says what it needs (export_run)
        missing = "" if llamacpp.available() else TEXT["kquant_missing"].format(install=llamacpp.INSTALL)
        return gr.update(choices=["f16", "q8_0", *llamacpp.KQUANTS], value="f16",
                         info=TEXT["gguf_types"].format(missing=missing))

    kind.change(on_kind, [kind], [dtype], api_name=False)
    go.click(on_export, [picker, run, weights, kind, dtype, shard, dest, overwrite, verify], [result, table],
             api_name=False)
    run.change(lambda rid: (pick_weights(rid), run_note(db, rid)), [run], [weights, note], api_name=False)
    # Every re-list keeps the picked run while it is in the project: the project picker is filled
    # at page load, and its change could arrive after the user had picked a run (the e2e test
    # saw the newest run replace the picked one).
    relist = [picker, run, weights]
    picker.change(refresh, relist, [run, weights, note, table], api_name=False)
    demo.load(refresh, relist, [run, weights, note, table], api_name=False)
    if tab is not None:
        tab.select(refresh, relist, [run, weights, note, table], api_name=False)
    # A combined adapter is exportable at once: the run list re-lists and picks it.
    combined.done.then(lambda project_id, made, current: refresh(project_id, made if made is not None else current),
                       [picker, combined.made, run], [run, weights, note, table], api_name=False)
    return ExportHandles(run=run, weights=weights)
