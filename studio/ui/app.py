"""The app shell: header, project picker, system panel and the six tabs."""

from __future__ import annotations

import gradio as gr

from studio import projects
from studio.db import Database
from studio.ui import data_tab, labels, method_tab, placeholders, projects_panel, system_panel


CSS = """
mark.loss { background: #fde68a; color: inherit; border-radius: 2px; }
.token-preview { max-height: 28em; overflow-y: auto; }
"""


def build_app(db: Database | None = None) -> gr.Blocks:
    db = db or Database()
    projects.ensure_starter_project(db)
    with gr.Blocks(title=labels.TITLE) as demo:
        gr.Markdown(f"# {labels.TITLE}\n{labels.TAGLINE}", elem_id="app-header")
        with gr.Row():
            with gr.Column(scale=4):
                picker, load_projects = projects_panel.build(db)
                with gr.Tabs(elem_id="main-tabs"):
                    for name in labels.TABS:
                        with gr.Tab(name, id=name.lower(), elem_id=f"tab-{name.lower()}"):
                            if name == "Method":
                                method_tab.build(demo)
                                continue
                            if name == "Data":
                                data_tab.build(demo, db, picker)
                                continue
                            placeholders.build(name)
            with gr.Column(scale=1, min_width=260):
                summary, read_summary = system_panel.build()
        demo.load(load_projects, None, [picker], api_name=False)
        demo.load(read_summary, None, [summary], api_name=False)
    return demo
