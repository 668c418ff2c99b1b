"""The app shell: header, project picker, system panel and the seven tabs, wired explicitly.

Each tab's ``build`` returns the handles other tabs need; the wiring between tabs is here, not
found by searching the built blocks. The session's run draft (``studio.ui.draft``) is one
``gr.State`` that the Method and Train tabs both edit and redraw from: when a tab is opened, when
the project changes (its model and datasets) and after History's clone.

The Train tab's polling timer is placed after ``gr.Tabs``, not inside its tab: a timer inside a
tab does not tick until that tab has been opened, and a running training must be followed (and a
dead worker reconciled) from page load. Every poll slows to ``polling.IDLE_SECONDS`` while no run
is active; History's polls (its runs table, the Bake-off section) are also turned off while
another main tab is open, and on again when History is opened."""

from __future__ import annotations

import gradio as gr

from studio import projects
from studio.db import Database
from studio.runs import launch
from studio.ui import (bakeoff_tab, compare_tab, data_tab, export_tab, history_tab, labels, method_tab,
                       projects_panel, serve_tab, system_panel, train_tab)
from studio.ui.draft import RunDraft
from studio.ui.wiring import DRAFT_QUEUE

CSS = """
mark.loss { background: #fde68a; color: inherit; border-radius: 2px; }
.token-preview { max-height: 28em; overflow-y: auto; }
/* Every table: headers break between words, never inside one (a wide table scrolls instead). */
th, th * { word-break: normal !important; overflow-wrap: normal !important; }
"""


def build_app(db: Database | None = None) -> gr.Blocks:
    db = db or Database()
    projects.ensure_starter_project(db)
    launch.reconcile(db)  # at start-up too: runs whose worker died while the UI was closed
    with gr.Blocks(title=labels.TITLE) as demo:
        gr.Markdown(f"# {labels.TITLE}\n{labels.TAGLINE}", elem_id="app-header")
        # Deep-copied for each browser session: every session edits its own draft.
        draft = gr.State(RunDraft(gpu_gib=method_tab.local_gpu_gib()))
        with gr.Row():
            with gr.Column(scale=4):
                picker, load_projects = projects_panel.build(db)
                with gr.Tabs(elem_id="main-tabs") as main_tabs:
                    tabs = {name: gr.Tab(name, id=name.lower(), elem_id=f"tab-{name.lower()}") for name in labels.TABS}
                    with tabs["Data"]:
                        data_tab.build(demo, db, picker)
                    with tabs["Method"]:
                        method = method_tab.build(demo, draft)
                    with tabs["Train"]:
                        train = train_tab.build(demo, db, picker, draft)
                    with tabs["Compare"]:
                        compare_tab.build(demo, db, picker, tabs["Compare"])
                    with tabs["History"]:
                        history = history_tab.build(demo, db, picker, tabs["History"], sections=[
                            ("Bake-off", lambda sub: bakeoff_tab.build(demo, db, picker, sub))])
                    with tabs["Export"]:
                        export_tab.build(demo, db, picker, tabs["Export"])
                    with tabs["Serve"]:
                        serve_tab.build(demo, db, picker, tabs["Serve"])
                train.attach_timer()
            with gr.Column(scale=1, min_width=260):
                summary, read_summary = system_panel.build()

        # Each view of the draft draws from it when opened; both follow the project.
        train.view.on(tabs["Train"].select)
        method.view.on(tabs["Method"].select)
        # History's polls run only while History is open (its own select refreshes it at once). One
        # handler on the tab strip rather than one more on each tab's select.
        def history_polls(evt: gr.SelectData):
            return [gr.Timer(active=evt.value == "History")] * len(history.timers)

        main_tabs.select(history_polls, None, history.timers, api_name=False, show_progress="hidden")

        def for_project(project_id, current: RunDraft) -> RunDraft:
            project = db.get_project(project_id) if project_id is not None else None
            return current.with_plan(model=project.model_source) if project is not None else current

        # The page's first project is already the picker's value (no change event then): follow it on load too.
        for event in (picker.change(for_project, [picker, draft], [draft], api_name=False, concurrency_id=DRAFT_QUEUE),
                      demo.load(load_projects, None, [picker], api_name=False).then(
                          for_project, [picker, draft], [draft], api_name=False, concurrency_id=DRAFT_QUEUE)):
            method.view.after(train.view.after(event))
        history_tab.wire_clone(db, picker, history, draft, main_tabs, [train.view, method.view])
        demo.load(read_summary, None, [summary], api_name=False)
    return demo
