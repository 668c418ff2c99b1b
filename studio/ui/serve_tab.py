"""The Serve tab: start and stop a ``peft-studio serve`` child for the project, see what it serves
(read from the running server's ``GET /v1/models``) and copy the lines that call it.

The widgets and their wiring only: the child is ``studio.serve.process.SERVER`` (one per app
process, started in its own process group, stopped when the app exits), the drawing is
``studio.ui.serve_view``. Nothing here polls: the status and the models table are read when the
tab is opened and after Start and Stop; a server that died meanwhile is noticed then.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import gradio as gr

from studio import config
from studio.db import Database
from studio.serve import process
from studio.serve.process import ServeRefused, ServeSettings
from studio.ui import labels
from studio.ui import serve_view as view

TEXT = labels.SERVE


@dataclass
class ServeHandles:
    start: gr.Button
    stop: gr.Button
    status: gr.Markdown
    models: gr.Dataframe


def _server_view(status=None):
    """(status text, models table, curl, python, snippet note) for the server as it is now."""
    status = status or process.SERVER.status()
    models, problem = [], ""
    if status.running:
        try:
            models = process.fetch_models(status)
        except (OSError, ValueError) as exc:  # the child may have just died: say so, keep the tab up
            problem = "\n\n" + TEXT["models_failed"].format(reason=exc)
            status = process.SERVER.status()
    curl, python, note = view.snippets(status, models)
    return (view.status_text(status) + problem, view.models_frame(models), curl, python, note)


def build(demo: gr.Blocks, db: Database, picker: gr.Dropdown, tab: gr.Tab | None = None) -> ServeHandles:
    """Render the tab. ``tab``: opening it re-reads the project's servable runs and the server."""
    process.stop_on_exit()  # build runs on the main thread: the one place a SIGTERM handler can be set
    gr.Markdown(TEXT["intro"])
    with gr.Row():
        with gr.Column(scale=2):
            runs = gr.Dropdown(label=TEXT["runs"], info=TEXT["runs_help"], choices=[], multiselect=True,
                               elem_id="serve-runs")
            with gr.Row():
                host = gr.Textbox(config.DEFAULT_HOST, label=TEXT["host"], info=TEXT["host_help"],
                                  elem_id="serve-host")
                port = gr.Number(8000, precision=0, minimum=0, maximum=65535, label=TEXT["port"],
                                 info=TEXT["port_help"], elem_id="serve-port")
            with gr.Row():
                key = gr.Textbox(label=TEXT["key"], info=TEXT["key_help"], type="password", scale=3,
                                 elem_id="serve-key")
                generate = gr.Button(TEXT["generate"], scale=1, size="sm", elem_id="serve-generate")
            max_active = gr.Number(8, precision=0, minimum=1, maximum=1024, label=TEXT["max_active"],
                                   info=TEXT["max_active_help"], elem_id="serve-max-active")
            with gr.Row():
                start = gr.Button(TEXT["start"], variant="primary", elem_id="serve-start")
                stop = gr.Button(TEXT["stop"], variant="stop", elem_id="serve-stop")
        with gr.Column(scale=3):
            planned = gr.Dataframe(label=TEXT["planned"], interactive=False, wrap=True, elem_id="serve-planned")
            planned_note = gr.Markdown(elem_id="serve-planned-note")
    status = gr.Markdown(TEXT["not_running"], elem_id="serve-status")
    models = gr.Dataframe(label=TEXT["models"], interactive=False, elem_id="serve-models")
    with gr.Row():
        curl = gr.Code(label=TEXT["curl"], language="shell", interactive=False, wrap_lines=True,
                       buttons=["copy"], elem_id="serve-curl")
        python = gr.Code(label=TEXT["python"], language="python", interactive=False, wrap_lines=True,
                         buttons=["copy"], elem_id="serve-python")
    snippet_note = gr.Markdown(TEXT["snippet_idle"], elem_id="serve-snippet-note")
    server_outputs = [status, models, curl, python, snippet_note]

    def on_project(project_id, picked):
        choices = view.run_choices(db, project_id)
        keep = [p for p in picked or [] if p in {c[1] for c in choices}]
        return (gr.update(choices=choices, value=keep), *view.planned(db, project_id, view.runs_arg(keep)))

    def on_open(project_id, picked):
        return (*on_project(project_id, picked), *_server_view())

    def on_start(project_id, picked, host_v, port_v, key_v, max_active_v, progress=gr.Progress()):
        if project_id is None or db.get_project(project_id) is None:
            return (TEXT["no_project"], *_server_view()[1:])
        try:
            settings = ServeSettings(project=int(project_id), runs=view.runs_arg(picked),
                                     host=(host_v or "").strip(), port=_whole(port_v, "port"),
                                     api_key=key_v or None, max_active=_whole(max_active_v, "max active adapters"))
            started = process.SERVER.start(
                settings, on_wait=lambda seconds, tail: progress(None, desc=TEXT["starting"].format(seconds=seconds)))
        except ServeRefused as exc:
            text, *rest = _server_view()
            return (TEXT["refused"].format(reason=_block(str(exc))), *rest)
        return _server_view(started)

    def on_stop():
        return _server_view(process.SERVER.stop())

    runs.input(lambda pid, picked: view.planned(db, pid, view.runs_arg(picked)), [picker, runs],
               [planned, planned_note], api_name=False)
    picker.change(on_project, [picker, runs], [runs, planned, planned_note], api_name=False)
    if tab is not None:
        tab.select(on_open, [picker, runs], [runs, planned, planned_note, *server_outputs], api_name=False)
    generate.click(lambda: secrets.token_urlsafe(24), None, [key], api_name=False)
    # Start and Stop are separate events: a Stop clicked while the model loads ends that start.
    start.click(on_start, [picker, runs, host, port, key, max_active], server_outputs, api_name=False)
    stop.click(on_stop, None, server_outputs, api_name=False)
    return ServeHandles(start=start, stop=stop, status=status, models=models)


def _whole(value, field: str) -> int:
    if value is None or float(value) != int(value):
        raise ServeRefused(f"{field}: expected a whole number, got {value!r}")
    return int(value)


def _block(text: str) -> str:
    """A multi-line reason (a log tail) as a code block under its first line."""
    first, _, rest = text.partition("\n")
    return f"{first}\n\n```\n{rest.strip()}\n```" if rest.strip() else first
