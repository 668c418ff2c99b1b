"""The Export tab: pick a finished run, export it merged or adapter-only, see the verification,
and the project's exports with their paths, sizes and results."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from studio.db import Database, RunStatus
from studio.methods import get_method
from studio.runspec import RunSpec


def _finished_runs(db: Database, project_id: int | None) -> list[tuple[str, int]]:
    if project_id is None:
        return []
    return [(f"#{r.id} {r.name} ({r.method})", r.id) for r in db.list_runs(project_id)
            if r.status == RunStatus.COMPLETED.value]


def _exports_table(db: Database, project_id: int | None) -> pd.DataFrame:
    rows = []
    for e in db.list_exports(project_id) if project_id is not None else []:
        v = e.verification or {}
        rows.append({"id": e.id, "run": e.run_id, "kind": e.kind, "dtype": e.dtype, "status": e.status,
                     "size MB": round((e.size_bytes or 0) / 1e6, 1),
                     "max |Δlogit|": v.get("max_abs_diff"), "greedy agree": v.get("greedy_agreement"),
                     "path": e.path})
    return pd.DataFrame(rows, columns=["id", "run", "kind", "dtype", "status", "size MB", "max |Δlogit|",
                                       "greedy agree", "path"])


def run_note(db: Database, run_id: int | None) -> str:
    if run_id is None:
        return "Finish a training run first: exports are made from completed runs."
    spec = RunSpec.from_dict(db.get_run(run_id).spec)
    method = get_method(spec.method)
    if not method.mergeable:
        return f"**{method.title} cannot be merged.** {method.notes} Choose *adapter* to export it."
    if method.quantized:
        return ("**QLoRA:** the merged export is the 4-bit base de-quantised to the chosen dtype with the "
                "adapter merged in; its outputs are compared with the 4-bit model as trained.")
    return f"{method.title}: merges into the base with no inference overhead."


def build(demo: gr.Blocks, db: Database, picker: gr.Dropdown, tab: gr.Tab | None = None) -> None:
    """Render the tab. ``tab``: the tab itself; opening it re-lists the runs (one may have
    finished in the Train tab since the page loaded)."""
    with gr.Row():
        with gr.Column(scale=2):
            run = gr.Dropdown(label="Finished run", choices=[], elem_id="export-run")
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

    def refresh(project_id, current=None):
        choices = _finished_runs(db, project_id)
        ids = [c[1] for c in choices]
        value = current if current in ids else (ids[0] if ids else None)
        return gr.update(choices=choices, value=value), run_note(db, value), _exports_table(db, project_id)

    def on_export(project_id, run_id, kind_v, dtype_v, shard_v, dest_v, overwrite_v, verify_v,
                  progress=gr.Progress()):
        from studio.export import ExportError, export_run

        if run_id is None:
            return "**Pick a finished run first.**", _exports_table(db, project_id)
        try:
            row = export_run(db, run_id, kind_v, dtype_v, shard_size=shard_v or "2GB", dest=dest_v or None,
                             overwrite=overwrite_v, verify=verify_v,
                             progress=lambda f, m: progress(f, desc=m))
        except (ExportError, OSError, ValueError) as exc:
            return f"**Export failed:** {exc}", _exports_table(db, project_id)
        v = row.verification or {}
        checked = (f"max |Δlogit| {v['max_abs_diff']:.2e}, greedy agreement {v['greedy_agreement']:.0%} over "
                   f"{v['prompts']} prompts, loaded with {v['loader']}" if "max_abs_diff" in v else v.get("note", ""))
        return (f"**Export {row.status}:** `{row.path}` ({(row.size_bytes or 0) / 1e6:.1f} MB). {checked}",
                _exports_table(db, project_id))

    def on_kind(kind_v):
        choices = ["f16", "q8_0"] if kind_v == "gguf" else ["float32", "bfloat16", "float16"]
        return gr.update(choices=choices, value=choices[0])

    kind.change(on_kind, [kind], [dtype], api_name=False)
    go.click(on_export, [picker, run, kind, dtype, shard, dest, overwrite, verify], [result, table],
             api_name=False)
    run.change(lambda rid: run_note(db, rid), [run], [note], api_name=False)
    picker.change(refresh, [picker], [run, note, table], api_name=False)
    demo.load(refresh, [picker], [run, note, table], api_name=False)
    if tab is not None:
        tab.select(refresh, [picker, run], [run, note, table], api_name=False)
