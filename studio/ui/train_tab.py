"""The Train tab: choose data, method and steps, see the memory estimate, start a background
worker, and watch its progress, curves and log; stop (keeping or discarding checkpoints), resume,
and read a finished run's summary.

A view of the session's run draft (``studio.ui.draft``), like the Method tab: its data, method and
training settings are the draft's, and Start starts the draft's run (``train_actions``). One
``gr.Timer`` polls the database (the worker's only channel back), so a restarted UI re-attaches
to a running training at once; app.py places that timer outside the tabs. It ticks every second
while a run is running or queued and every ``polling.IDLE_SECONDS`` otherwise (``polling``); Start
and Resume wake it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import gradio as gr

from studio import sysinfo
from studio.db import Database, RunStatus
from studio.methods import all_methods
from studio.runs import launch
from studio.runspec import OPTIMIZERS, PRECISIONS, SCHEDULES, RunSpec
from studio.trackers.choice import TRACKERS, missing
from studio.ui import data_choice, estimates, labels, polling
from studio.ui.draft import TRAINING_FIELDS, RunDraft
from studio.ui.train_actions import (choices_of, resume_run, run_choices, run_to_follow, start_run, stop_run,
                                     with_tracker)
from studio.ui.train_view import LOG_LINES, nice_limits, render_run
from studio.ui.wiring import DRAFT_QUEUE, DraftView, edits

OPTIONS = TRAINING_FIELDS  # every training setting has its widget here
SHOWN = (*OPTIONS, "trackers")  # every RunSpec field a widget here sets (the switches: _tracker_boxes)
CHOICES = {"lr_scheduler": list(SCHEDULES), "precision": list(PRECISIONS), "optimizer": list(OPTIMIZERS)}
MINIMUM = {"batch_size": 1, "grad_accum": 1, "max_length": 16, "seed": None}
POLL_SECONDS = 1.0  # while a run is active; see polling.IDLE_SECONDS otherwise


@dataclass
class TrainHandles:
    """What app.py wires: the redraw from the draft, and the poll timer to place outside the tabs
    (a timer inside a tab would not tick until the tab was opened)."""
    view: DraftView
    attach_timer: Callable[[], gr.Timer]


def option_elem_id(name: str) -> str:
    return "train-steps" if name == "max_steps" else f"train-{name.replace('_', '-')}"


def several_gpus() -> bool:
    """True where the "Processes (DDP)" setting applies: one process per GPU needs several GPUs.
    (``peft-studio train --nproc-per-node`` works everywhere, gloo processes on a CPU too.)"""
    return len(sysinfo.probe_accelerators().get("gpus") or []) > 1


def _option(name: str) -> gr.components.Component:
    """The widget for one RunSpec field: its default, label and help in one place."""
    default, elem_id = getattr(RunSpec(), name), option_elem_id(name)
    if name == "nproc_per_node":  # shown only when it applies (several GPUs)
        label, info = labels.TRAIN_FIELDS[name]
        return gr.Number(default, label=label, info=info, minimum=0, maximum=64, precision=0,
                         elem_id=elem_id, visible=several_gpus())
    label, info = labels.TRAIN_FIELDS[name]
    if isinstance(default, bool):
        return gr.Checkbox(default, label=label, info=info, elem_id=elem_id)
    if name in CHOICES:
        return gr.Dropdown(CHOICES[name], value=default, label=label, info=info, elem_id=elem_id)
    return gr.Number(default, label=label, info=info, minimum=MINIMUM.get(name, 0),
                     precision=0 if isinstance(default, int) else None, elem_id=elem_id)


def project_model(db: Database, project_id: int | None) -> str | None:
    project = db.get_project(project_id) if project_id is not None else None
    return project.model_source if project is not None else None


def redraw(db: Database, project_id: int | None, draft: RunDraft) -> list[Any]:
    """[draft, data, method, *options] as the draft says; the data list is the project's now, and
    a dataset no longer offered falls back to the default sample task (in the draft too)."""
    offered = data_choice.choices(db, project_id)
    data = data_choice.kept(draft.data, offered)
    if data != draft.data:
        draft = draft.with_data(data)
    return [draft, gr.update(choices=offered, value=data), draft.spec.method,
            *(getattr(draft.spec, name) for name in OPTIONS), *(name in draft.spec.trackers for name in TRACKERS)]


def _tracker_boxes() -> dict[str, gr.Checkbox]:
    """One switch per experiment tracker; a tracker whose package is missing is off and greyed,
    its help the install line (so the user learns why, not only that it cannot be chosen)."""
    boxes = {}
    with gr.Row():
        for name in TRACKERS:
            label, info = labels.TRAIN_TRACKERS[name]
            why = missing(name)
            boxes[name] = gr.Checkbox(False, label=label, info=why or info, interactive=why is None,
                                      elem_id=f"train-tracker-{name}")
    return boxes


def build(demo: gr.Blocks, db: Database, picker: gr.Dropdown, draft: gr.State) -> TrainHandles:
    help_ = labels.TRAIN_HELP
    with gr.Row():
        with gr.Column(scale=2):
            data = gr.Dropdown(data_choice.choices(db, None), value=data_choice.DEFAULT, label=labels.TRAIN_DATA,
                               info=help_["data"], elem_id="train-data")
            method = gr.Dropdown([(m.title, m.name) for m in all_methods()], value=RunSpec().method,
                                 label=labels.TRAIN_METHOD, info=help_["method"], elem_id="train-method")
            widgets = {"max_steps": _option("max_steps")}
            with gr.Accordion(labels.TRAIN_ADVANCED, open=False, elem_id="train-advanced"):
                advanced = OPTIONS[1:]  # two a row: the column is narrow (checkbox labels wrap at three)
                for row in range(0, len(advanced), 2):
                    with gr.Row():
                        widgets.update({name: _option(name) for name in advanced[row:row + 2]})
                trackers = _tracker_boxes()
            estimate_md = gr.Markdown(elem_id="train-estimate")
            start = gr.Button(labels.TRAIN_START, variant="primary", size="lg", elem_id="train-start")
            message = gr.Markdown(elem_id="train-message")
        with gr.Column(scale=3):
            run_dd = gr.Dropdown([], value=None, label=labels.TRAIN_RUN, info=help_["run"], elem_id="train-run")
            status = gr.Markdown(labels.TRAIN_NO_RUN, elem_id="train-status")
            progress = gr.HTML(elem_id="train-progress")
            with gr.Row():
                stop = gr.Button(labels.TRAIN_STOP, size="sm", elem_id="train-stop")
                discard = gr.Button(labels.TRAIN_DISCARD, variant="stop", size="sm", elem_id="train-discard")
                resume = gr.Button(labels.TRAIN_RESUME, size="sm", elem_id="train-resume")
            summary = gr.Markdown(elem_id="train-summary")
            plots = _plots()
    # Full width below both columns: log lines are long, and wrapped they would not fit the box.
    log = gr.Textbox(label=labels.TRAIN_LOG, lines=LOG_LINES, max_lines=2 * LOG_LINES, interactive=False,
                     autoscroll=True, elem_id="train-log")
    shown = gr.State({"key": None, "choices": None})
    # [run id, mode] of a stop asked for and not yet seen done. Its own state, written only by the
    # stop buttons and cleared only by the poll that saw the run end: kept in ``shown``, a poll
    # already running when Stop is clicked would write its older copy back and lose it.
    stopping = gr.State(None)
    view_outputs = [status, progress, *plots, log, summary]
    # Rendered by attach_timer, outside the tabs; made here so that Start and Resume can wake it.
    timer = gr.Timer(POLL_SECONDS, render=False)

    def on_estimate(project_id, current: RunDraft):
        model = project_model(db, project_id)
        return estimates.train_estimate(current, model) if model else labels.TRAIN_ESTIMATE["no_project"]

    def on_start(project_id, current: RunDraft):
        text, run_id = start_run(db, project_id, current)
        if run_id is None:
            return text, gr.update(), gr.skip()
        return text, gr.update(choices=run_choices(db, project_id), value=run_id), polling.wake(POLL_SECONDS)

    def on_select(run_id, state, old_key=None):
        """The selected run's view; parts whose key equals ``old_key`` are not re-sent (a plot
        re-sent every second would redraw every second)."""
        view, (plot_key, text_key) = render_run(db, run_id), old_key or (None, None)
        keep, texts_same, plots_same = gr.update(), view.key[1] == text_key, view.key[0] == plot_key
        new_plots = [gr.update(value=f, x_lim=view.x_lim, y_lim=nice_limits(f["value"]))
                     for f in (view.loss, view.lr, view.speed)]
        return [keep if texts_same else view.status, keep if texts_same else view.progress,
                *([keep] * 3 if plots_same else new_plots),
                *([keep] * 2 if texts_same else [view.log, view.summary]), {**state, "key": view.key}]

    def poll(project_id, run_id, state, stopping_v=None, period=None):
        """[run list, *view, state, message, stopping, timer]: the view of the run to follow, and
        the timer's interval for what can change now (fast while a run is active or a stop the
        page asked for is not yet seen done)."""
        launch.reconcile(db)  # a worker that died cannot write its own end
        runs = db.list_runs(project_id) if project_id is not None else []  # once per tick
        choices = choices_of(runs)
        selected = run_to_follow(runs, state.get("choices"), run_id)
        run_update = gr.update()
        if choices != state.get("choices") or selected != run_id:
            run_update = gr.update(choices=choices, value=selected)
        outputs = [run_update, *on_select(selected, {"choices": choices}, state.get("key"))]
        # "Stopping run #N..." becomes what happened once the run has stopped.
        stopped = db.get_run(stopping_v[0]) if stopping_v else None
        if stopping_v and (stopped is None or stopped.status != RunStatus.RUNNING.value):
            done = labels.TRAIN_MSG["stopped"][stopping_v[1]].format(
                id=stopping_v[0], status=stopped.status if stopped else "deleted")
            return [*outputs, done, None, polling.pace(period, polling.interval(db, POLL_SECONDS))]
        wanted = polling.interval(db, POLL_SECONDS, keep_fast=bool(stopping_v))
        return [*outputs, gr.update(), gr.skip(), polling.pace(period, wanted)]

    def on_stop(run_id, pending, mode):
        run = db.get_run(run_id) if run_id is not None else None
        was_running = run is not None and run.status == RunStatus.RUNNING.value
        return stop_run(db, run_id, mode), [run_id, mode] if was_running else pending

    estimate = (on_estimate, [picker, draft], [estimate_md])

    def estimate_after(event):
        event.success(*estimate, api_name=False, show_progress="hidden")

    estimate_after(edits(data, lambda d, v: d.with_data(v), draft))
    estimate_after(edits(method, lambda d, m: d.with_method(m), draft))
    for name, widget in widgets.items():
        estimate_after(edits(widget, lambda d, v, n=name: d.with_field(n, v), draft))
    for name, box in trackers.items():  # no estimate to redo: a tracker costs no memory to speak of
        edits(box, lambda d, v, n=name: with_tracker(d, n, v), draft)
    # Start reads the draft after the edits already sent (one queue): a value typed just before
    # the click is in the run.
    start.click(lambda: None, None, None, api_name=False, show_progress="hidden", concurrency_id=DRAFT_QUEUE).then(
        on_start, [picker, draft], [message, run_dd, timer], api_name=False).then(
        on_select, [run_dd, shown], [*view_outputs, shown], api_name=False, show_progress="hidden")
    stop.click(lambda rid, p: on_stop(rid, p, "save"), [run_dd, stopping], [message, stopping], api_name=False)
    discard.click(lambda rid, p: on_stop(rid, p, "discard"), [run_dd, stopping], [message, stopping],
                  api_name=False)
    resume.click(lambda rid: (resume_run(db, rid), polling.wake(POLL_SECONDS)), [run_dd], [message, timer],
                 api_name=False)
    run_dd.input(on_select, [run_dd, shown], [*view_outputs, shown], api_name=False, show_progress="hidden")
    view = DraftView(lambda project_id, current: redraw(db, project_id, current), [picker, draft],
                     [draft, data, method, *(widgets[name] for name in OPTIONS), *trackers.values()],
                     then=[estimate])

    def attach_timer() -> gr.Timer:
        timer.render()
        timer.tick(poll, [picker, run_dd, shown, stopping, timer],
                   [run_dd, *view_outputs, shown, message, stopping, timer],
                   api_name=False, show_progress="hidden", concurrency_limit=None)
        return timer

    return TrainHandles(view, attach_timer)


def _plots() -> list[gr.LinePlot]:
    # Short tick labels ("2e-4", "1.2k"): Gradio sizes the axes when a plot is rebuilt.
    common = dict(x="step", y="value", color="series", x_title="step", color_title="")
    loss = gr.LinePlot(label=labels.PLOTS["loss"], y_title="loss", elem_id="train-loss-plot",
                       color_map={"train loss": "#2563eb", "eval loss": "#f97316"}, **common)
    common.update(colors_in_legend=[], height=260)  # one series each: no legend
    with gr.Row():
        lr = gr.LinePlot(label=labels.PLOTS["lr"], y_title="learning rate", y_axis_format="~e",
                         elem_id="train-lr-plot", **common)
        speed = gr.LinePlot(label=labels.PLOTS["speed"], y_title="tokens/s", y_axis_format="~s",
                            elem_id="train-speed-plot", **common)
    return [loss, lr, speed]
