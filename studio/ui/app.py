"""The app shell: header, project picker, system panel and the six tabs.

The Train tab's polling timer is placed after ``gr.Tabs``, not inside its tab: a timer inside a
tab does not tick until that tab has been opened, and a running training must be followed (and a
dead worker reconciled) from page load."""

from __future__ import annotations

import gradio as gr

from studio import projects
from studio.db import Database
from studio.runs import launch
from studio.ui import (bakeoff_tab, compare_tab, data_tab, export_tab, history_tab, labels, method_tab,
                       projects_panel, system_panel, train_tab)


CSS = """
mark.loss { background: #fde68a; color: inherit; border-radius: 2px; }
.token-preview { max-height: 28em; overflow-y: auto; }
/* Wide tables: headers break between words, never inside one (the table scrolls instead). */
#bakeoff-table th, #bakeoff-table th *, #history-runs th, #history-runs th * {
  word-break: normal !important; overflow-wrap: normal !important; }
"""


def build_app(db: Database | None = None) -> gr.Blocks:
    db = db or Database()
    projects.ensure_starter_project(db)
    launch.reconcile(db)  # at start-up too: runs whose worker died while the UI was closed
    with gr.Blocks(title=labels.TITLE) as demo:
        gr.Markdown(f"# {labels.TITLE}\n{labels.TAGLINE}", elem_id="app-header")
        with gr.Row():
            with gr.Column(scale=4):
                picker, load_projects = projects_panel.build(db)
                method_choice, attach_train_timer = None, None
                with gr.Tabs(elem_id="main-tabs") as main_tabs:
                    for name in labels.TABS:
                        with gr.Tab(name, id=name.lower(), elem_id=f"tab-{name.lower()}") as tab:
                            if name == "Method":
                                method_choice = method_tab.build(demo)
                                continue
                            if name == "Train":
                                attach_train_timer = train_tab.build(
                                    demo, db, picker, method_choice, train_tab.find_method_settings(demo), tab)
                                continue
                            if name == "Data":
                                data_tab.build(demo, db, picker)
                                continue
                            if name == "History":
                                history_tab.build(demo, db, picker, main_tabs, tab, sections=[
                                    ("Bake-off", lambda sub: bakeoff_tab.build(demo, db, picker, sub))])
                                continue
                            if name == "Compare":
                                compare_tab.build(demo, db, picker, tab)
                                continue
                            if name == "Export":
                                export_tab.build(demo, db, picker, tab)
                                continue
                if attach_train_timer is not None:
                    attach_train_timer()
            with gr.Column(scale=1, min_width=260):
                summary, read_summary = system_panel.build()
        demo.load(load_projects, None, [picker], api_name=False)
        demo.load(read_summary, None, [summary], api_name=False)
    return demo
