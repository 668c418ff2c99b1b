"""The History tab: a project's runs (filter, sort, open one for its curves, runspec and log;
rename, note, delete with confirmation, clone into the session's run draft and the Train tab), a comparison of 2-8 runs
(loss curves overlaid, the configuration fields that differ), and the project's datasets and
exports.

Sub-sections are tabs inside the tab; ``build(sections=...)`` adds more after the built-in ones
(the bake-off plugs in there). The handlers are module functions taking plain values (no
components), so tests call them against a real database; ``build`` only wires them to widgets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from studio import history
from studio.db import Database, RunStatus
from studio.methods import get_method
from studio.ui import data_choice, labels, polling, train_tab
from studio.ui import history_view as view
from studio.ui.draft import RunDraft
from studio.ui.train_view import nice_limits
from studio.ui.wiring import DRAFT_QUEUE, DraftView

TXT = labels.HISTORY
LIVE_SECONDS = 3.0  # how often the runs table checks for runs that changed elsewhere, while a run is active


@dataclass
class HistoryHandles:
    """What app.py wires to the Train and Method tabs (``wire_clone``)."""
    clone: gr.Button
    run: gr.Dropdown  # the run opened, the one a clone copies
    message: gr.Markdown
    # The tab's polls (the runs table's, and any a section returned): app.py turns them off while
    # another main tab is open and on when this one is opened again.
    timers: list[gr.Timer]


# ---- handlers (plain values in, plain values / updates out) ----
def runs_listing(db: Database, project_id: int | None, text: str = "", statuses: Sequence[str] = (),
                 methods: Sequence[str] = (), sort: str = "created_at", descending: bool = True):
    """(table, run choices, method choices): the filtered, sorted runs of the project."""
    every = history.run_summaries(db, project_id)
    rows = history.sort_runs(history.filter_runs(every, text, statuses, methods), sort or "created_at",
                             bool(descending))
    return view.runs_table(rows), view.run_choices(rows), sorted({r.method for r in every})


def live_listing(db: Database, project_id: int | None, shown: str | None, *filters: Any):
    """What the runs table's poll sends: (fingerprint, ``runs_listing``) when the table differs from
    the one last shown (``shown`` is its fingerprint), else (shown, None). Runs change state in
    worker processes; a table re-sent on every tick would reset the user's scroll, so it is sent
    only when a cell changed."""
    listing = runs_listing(db, project_id, *filters)
    fingerprint = listing[0].to_json()
    return (shown, None) if fingerprint == shown else (fingerprint, listing)


def delete_question(db: Database, run_id: int | None) -> str:
    run = db.get_run(run_id) if run_id is not None else None
    if run is None:
        return ""
    return TXT["delete_warning"].format(id=run.id, name=run.name, folder=run.folder or "—")


def clone_draft(db: Database, project_id: int | None, run_id: int | None, draft: RunDraft) -> tuple[RunDraft, str]:
    """(the session's draft with the run's RunSpec, the message) for "clone into Train tab": every
    field is kept, including those no widget shows (the message names them). Raises HistoryError
    (a ValueError) when it cannot."""
    spec = history.clone_spec(db, run_id)
    run, project = db.get_run(run_id), db.get_project(project_id) if project_id is not None else None
    if project is None or run.project_id != project.id:
        raise history.HistoryError("pick the run's project first")
    get_method(spec.method)  # a method this version lacks: refused by name, nothing changed
    cloned, notes = draft.with_spec(spec), []
    if data_choice.kept(cloned.data, data_choice.choices(db, project.id), None) is None:
        notes.append(TXT["clone_no_data"])
        cloned = cloned.with_data(draft.data)
    hidden = history.hidden_changes(spec, train_tab.SHOWN)
    if hidden:
        notes.append(TXT["clone_hidden"].format(fields=", ".join(f"{k} = {v!r}" for k, v in hidden.items())))
    if spec.model != project.model_source:
        notes.append(TXT["clone_model"].format(model=spec.model, project_model=project.model_source))
    return cloned, TXT["cloned"].format(id=run.id, name=run.name) + "".join(f"  \n{n}" for n in notes)


def compare_message(run_ids: Sequence[int] | None, comparison: view.Comparison | None = None) -> str:
    """What the Compare sub-tab says above its curves, for the runs ticked."""
    n = len(run_ids or [])
    if n < 2:
        return TXT["compare_pick"]
    if n > view.MAX_COMPARE:
        return TXT["compare_too_many"].format(n=view.MAX_COMPARE)
    if comparison is None or comparison.diff.empty:
        return TXT["compare_same"]
    return TXT["compare_diff"].format(n=len(comparison.diff))


# ---- the tab ----
def build(demo: gr.Blocks, db: Database, picker: gr.Dropdown, tab: gr.Tab | None = None,
          sections: Sequence[tuple[str, Callable[[gr.Tab], gr.Timer | None]]] = ()) -> HistoryHandles:
    """Render the tab. ``sections``: (title, build function) pairs, each built in its own sub-tab
    after Runs, Compare and Project and given that sub-tab (to refresh when it is opened); a section
    that polls returns its timer (it joins ``HistoryHandles.timers``), e.g.
    ``[("Bake-off", lambda sub: bakeoff_tab.build(demo, db, picker, sub))]``."""
    with gr.Tabs(elem_id="history-sections"):
        with gr.Tab(TXT["runs"], id="runs", elem_id="history-tab-runs"):
            runs = _build_runs(demo, db, picker, tab)
        with gr.Tab(TXT["compare"], id="compare", elem_id="history-tab-compare") as compare_sub:
            pick = _build_compare(db)
        with gr.Tab(TXT["project"], id="project", elem_id="history-tab-project") as project_sub:
            with gr.Row():
                refresh_project = gr.Button(labels.REFRESH, size="sm", scale=0, elem_id="history-project-refresh")
            projects_df = gr.Dataframe(label=TXT["projects"], interactive=False, elem_id="history-projects")
            datasets_df = gr.Dataframe(label=TXT["datasets"], interactive=False, elem_id="history-datasets")
            exports_df = gr.Dataframe(label=TXT["exports"], interactive=False, wrap=True, elem_id="history-exports")
        for title, build_section in sections:
            slug = title.lower().replace(" ", "-")
            with gr.Tab(title, id=slug, elem_id=f"history-tab-{slug}") as sub:
                section_timer = build_section(sub)
                if section_timer is not None:
                    runs["handles"].timers.append(section_timer)

    def on_project(project_id):
        return view.projects_table(db), view.datasets_table(db, project_id), view.exports_table(db, project_id)

    def on_compare_choices(project_id, chosen):
        choices = view.run_choices(history.run_summaries(db, project_id))
        ids = [c[1] for c in choices]
        return gr.update(choices=choices, value=[i for i in (chosen or []) if i in ids])

    project_outputs = [projects_df, datasets_df, exports_df]
    # Each sub-tab refreshes when it is opened (what happened meanwhile shows at once).
    for trigger in [picker.change, refresh_project.click, project_sub.select]:
        trigger(on_project, [picker], project_outputs, api_name=False)
    for trigger in [picker.change, runs["refresh"].click, runs["changed"].change, compare_sub.select]:
        trigger(on_compare_choices, [picker, pick], [pick], api_name=False)
    return runs["handles"]


def _build_runs(demo: gr.Blocks, db: Database, picker: gr.Dropdown, tab: gr.Tab | None) -> dict[str, Any]:
    with gr.Row():
        text = gr.Textbox(label=TXT["search"], placeholder=TXT["search_hint"], scale=3, elem_id="history-search")
        statuses = gr.Dropdown([s.value for s in RunStatus], value=[], multiselect=True, label=TXT["status"],
                               scale=2, elem_id="history-status")
        methods = gr.Dropdown([], value=[], multiselect=True, label=TXT["method"], scale=2, elem_id="history-method")
        sort = gr.Dropdown(view.SORT_CHOICES, value="created_at", label=TXT["sort"], scale=2, elem_id="history-sort")
        descending = gr.Checkbox(True, label=TXT["descending"], scale=1, elem_id="history-desc")
        refresh = gr.Button(labels.REFRESH, size="sm", scale=0, min_width=90, elem_id="history-refresh")
    table = gr.Dataframe(view.runs_table([]), label=TXT["runs_table"], interactive=False, wrap=True,
                         max_height=420, elem_id="history-runs")
    run = gr.Dropdown([], value=None, label=TXT["open"], info=TXT["open_help"], elem_id="history-run")
    with gr.Row():
        with gr.Column(scale=2):
            summary = gr.Markdown(elem_id="history-run-summary")
            with gr.Row():
                name = gr.Textbox(label=TXT["name"], scale=3, elem_id="history-name")
                rename = gr.Button(TXT["rename"], size="sm", scale=1, elem_id="history-rename")
            notes = gr.Textbox(label=TXT["notes"], lines=2, elem_id="history-notes")
            save_note = gr.Button(TXT["save_note"], size="sm", elem_id="history-save-note")
            with gr.Row():
                clone = gr.Button(TXT["clone"], variant="primary", elem_id="history-clone")
                delete = gr.Button(TXT["delete"], variant="stop", elem_id="history-delete")
            with gr.Group(visible=False, elem_id="history-delete-confirm") as confirm_box:
                warning = gr.Markdown()
                with gr.Row():
                    confirm = gr.Button(labels.DELETE_CONFIRM, variant="stop", elem_id="history-delete-yes")
                    cancel = gr.Button(labels.CANCEL, elem_id="history-delete-no")
            message = gr.Markdown(elem_id="history-message")
        with gr.Column(scale=3):
            # Built afresh for each run opened (see _build_compare): a one-off update of data and
            # limits together sometimes drew the previous run's data or nothing (Gradio 6.31).
            @gr.render(inputs=[run], triggers=[run.change, refresh.click])
            def curves(run_id):
                d = view.run_detail(db, run_id)
                common = dict(x="step", y="value", color="series", x_title="step", color_title="", x_lim=d.x_lim)
                gr.LinePlot(d.loss, label=labels.PLOTS["loss"], y_title="loss", y_lim=nice_limits(d.loss["value"]),
                            color_map={"train loss": "#2563eb", "eval loss": "#f97316"}, elem_id="history-run-loss",
                            **common)
                gr.LinePlot(d.lr, label=labels.PLOTS["lr"], y_title="learning rate", y_axis_format="~e", height=220,
                            y_lim=nice_limits(d.lr["value"]), colors_in_legend=[], elem_id="history-run-lr", **common)
    with gr.Accordion(TXT["runspec"], open=False, elem_id="history-runspec-box"):
        runspec = gr.Code(language="json", interactive=False, elem_id="history-runspec")
    log = gr.Textbox(label=TXT["log"], lines=12, max_lines=view.DETAIL_LOG_LINES, interactive=False,
                     autoscroll=True, elem_id="history-log")
    # Bumped after a rename, note or delete: the Compare sub-tab refreshes its run list on it.
    changed = gr.Number(0, visible=False)
    # The run whose deletion is being asked about. Refreshes re-open the selected run (a rename or
    # note bumps ``changed``, which re-lists and re-opens); they must not close a question the user
    # is about to answer, so the box closes only when another run is opened.
    asking = gr.State(None)
    # Runs finish in worker processes: the poll refreshes the table (and the open run's summary and
    # log) when something changed. Not name or notes: that would overwrite what the user is typing.
    poll, shown = gr.Timer(LIVE_SECONDS), gr.State(None)

    filters = [picker, text, statuses, methods, sort, descending]

    def on_list(project_id, text_v, statuses_v, methods_v, sort_v, desc_v, current):
        frame, choices, method_names = runs_listing(db, project_id, text_v, statuses_v, methods_v, sort_v, desc_v)
        ids = [c[1] for c in choices]
        value = current if current in ids else (ids[0] if ids else None)
        return (frame, gr.update(choices=choices, value=value),
                gr.update(choices=method_names, value=[m for m in methods_v or [] if m in method_names]),
                frame.to_json())

    def on_open(run_id, asking_about):
        d = view.run_detail(db, run_id)
        still_asking = run_id is not None and run_id == asking_about
        return [d.summary, d.runspec, d.log, d.name, d.notes, gr.update() if still_asking else gr.update(visible=False)]

    def on_row(evt: gr.SelectData):
        try:
            return int(str(evt.row_value[0]))
        except (TypeError, ValueError, IndexError):
            return gr.update()

    def act(fn, run_id, *args):
        try:
            return TXT["done"].format(what=fn(db, run_id, *args))
        except history.HistoryError as exc:
            return TXT["failed"].format(reason=exc)

    def on_rename(run_id, new_name, n):
        return act(lambda d, r, v: TXT["renamed"].format(name=history.rename_run(d, r, v).name), run_id, new_name), n + 1

    def on_note(run_id, note, n):
        return act(lambda d, r, v: (history.set_note(d, r, v), TXT["noted"])[1], run_id, note), n + 1

    def on_delete(run_id, n):
        def go(d, r):
            gone = history.delete_run(d, r)
            return TXT["deleted_folder"].format(id=r, folder=Path(gone[0]).name) if gone else TXT["deleted"].format(id=r)
        return act(go, run_id), gr.update(visible=False), None, n + 1

    detail_outputs = [summary, runspec, log, name, notes, confirm_box]
    list_outputs = [table, run, methods, shown]
    # Opening the tab refreshes too: runs finish and get renamed elsewhere, and a tab not yet opened
    # does not receive the updates sent at page load.
    for trigger in [picker.change, refresh.click, text.submit, statuses.change, methods.input, sort.change,
                    descending.change, changed.change] + ([tab.select] if tab is not None else []):
        trigger(on_list, [*filters, run], list_outputs, api_name=False).then(
            on_open, [run, asking], detail_outputs, api_name=False, show_progress="hidden")

    def on_poll(project_id, last, run_id, period, *filter_values):
        # Slow while no run is active: a run that changes elsewhere still shows within IDLE_SECONDS.
        timer_update = polling.pace(period, polling.interval(db, LIVE_SECONDS))
        fingerprint, listing = live_listing(db, project_id, last, *filter_values)
        if listing is None:
            return last, gr.update(), gr.update(), gr.update(), gr.update(), timer_update
        frame, choices, _ = listing
        d = view.run_detail(db, run_id)
        return fingerprint, frame, gr.update(choices=choices), d.summary, d.log, timer_update

    poll.tick(on_poll, [picker, shown, run, poll, *filters[1:]], [shown, table, run, summary, log, poll],
              api_name=False, show_progress="hidden")
    run.input(on_open, [run, asking], detail_outputs, api_name=False)
    table.select(on_row, None, [run], api_name=False).then(on_open, [run, asking], detail_outputs, api_name=False)
    rename.click(on_rename, [run, name, changed], [message, changed], api_name=False)
    save_note.click(on_note, [run, notes, changed], [message, changed], api_name=False)
    delete.click(lambda rid: (gr.update(visible=rid is not None), delete_question(db, rid), rid), [run],
                 [confirm_box, warning, asking], api_name=False)
    cancel.click(lambda: (gr.update(visible=False), None), None, [confirm_box, asking], api_name=False)
    confirm.click(on_delete, [run, changed], [message, confirm_box, asking, changed], api_name=False)
    # A named endpoint: the restart test reads the table through gradio_client, as a user would see it.
    def history_runs(project_id: int) -> list[list[str]]:
        """The runs table as shown (header row first)."""
        frame = runs_listing(db, project_id)[0]
        return [list(frame.columns), *frame.values.tolist()]

    gr.api(history_runs, api_name="history_runs")
    return {"refresh": refresh, "changed": changed, "handles": HistoryHandles(clone, run, message, [poll])}


def _build_compare(db: Database) -> gr.CheckboxGroup:
    pick = gr.CheckboxGroup([], value=[], label=TXT["compare_label"], info=TXT["compare_help"],
                            elem_id="history-compare-pick")

    # Built afresh for every choice of runs (gr.render), not updated in place: Gradio's plot
    # recomputes its colours and legend only when it is built, and an update that changes the
    # series set, the colour map and the data together draws with a stale colour domain
    # (measured on 6.31: lines left transparent).
    @gr.render(inputs=[pick], triggers=[pick.change])
    def show(run_ids):
        ids = list(run_ids or [])
        if not 2 <= len(ids) <= view.MAX_COMPARE:
            gr.Markdown(compare_message(ids), elem_id="history-compare-message")
            return
        c = view.comparison(db, ids)
        gr.Markdown(compare_message(ids, c), elem_id="history-compare-message")
        common = dict(x="step", y="value", color="series", x_title="step", y_title="loss", color_title="",
                      color_map=c.color_map, x_lim=c.x_lim)
        with gr.Row():
            for title, frame, elem_id in ((TXT["compare_train"], c.train, "history-compare-train"),
                                          (TXT["compare_eval"], c.eval, "history-compare-eval")):
                gr.LinePlot(frame, label=title, y_lim=nice_limits(frame["value"]), elem_id=elem_id, **common)
        gr.Dataframe(c.results, label=TXT["compare_results"], interactive=False, wrap=True,
                     elem_id="history-compare-results")
        gr.Dataframe(c.diff, label=TXT["compare_diff_label"], interactive=False, wrap=True,
                     elem_id="history-compare-diff")

    return pick


def wire_clone(db: Database, picker: gr.Dropdown, handles: HistoryHandles, draft: gr.State,
               main_tabs: gr.Tabs, views: Sequence[DraftView]) -> None:
    """"Clone into Train tab": the run's RunSpec becomes the session's draft, the Train tab is
    opened, and ``views`` (the Train and Method tabs) redraw from the draft."""
    def on_clone(project_id, run_id, current: RunDraft):
        try:
            cloned, message = clone_draft(db, project_id, run_id, current)
        except (history.HistoryError, ValueError) as exc:  # said where the user looks; nothing changed
            return TXT["clone_failed"].format(reason=exc), current, gr.update()
        return message, cloned, gr.Tabs(selected="train")

    # The tab switch first, then the redraws: what the opened tabs show is the draft, whatever
    # order their own events arrive in.
    event = handles.clone.click(on_clone, [picker, handles.run, draft], [handles.message, draft, main_tabs],
                                api_name=False, concurrency_id=DRAFT_QUEUE)
    for tab_view in views:
        event = tab_view.after(event)
