"""The Train tab: choose data, method and steps, see the memory estimate, start a background
worker, and watch its progress, curves and log; stop (keeping or discarding checkpoints), resume,
and read a finished run's summary.

The UI never trains in its own process (and never imports torch): Start writes a RunSpec into a
new run (``launch.create_run``) and starts ``python -m studio.worker`` (``launch.start``). The
database is the only channel back: one ``gr.Timer`` polls it. Everything a run shows is read from
the database and the run's log, so a restarted UI re-attaches to a running training at once.

The module-level functions (``start_run``, ``render_run``, ...) are the handlers without Gradio,
so tests drive them directly against a real database and worker.
"""

from __future__ import annotations

import shutil
import threading
from typing import Any, Callable

import gradio as gr

from studio import sysinfo
from studio.db import Database, RunStatus
from studio.runspec import SCHEDULES, PRECISIONS, RunSpec, RunSpecError
from studio.samples import SAMPLE_TASKS
from studio.ui import labels, param_widgets
from studio.runs import launch
from studio.ui.train_view import LOG_LINES, nice_limits, render_run

GIB = 2**30
# The option widgets, in order, by the RunSpec field each one sets.
OPTIONS = ("max_steps", "epochs", "batch_size", "grad_accum", "learning_rate", "lr_scheduler",
           "max_length", "packing", "grad_checkpointing", "precision", "seed", "eval_steps",
           "exact_match_limit")
DEFAULT_DATA = f"sample:{next(iter(SAMPLE_TASKS))}"  # a newcomer can press Start at once
# Check-then-start must be atomic within this process: two quick clicks run in two threads.
_start_lock = threading.Lock()


# ---- choices ----
def data_choices(db: Database, project_id: int | None) -> list[tuple[str, str]]:
    """Sample tasks first (they need no Data-tab visit), then the project's datasets."""
    samples = [(f"Sample task: {t.title}", f"sample:{name}") for name, t in SAMPLE_TASKS.items()]
    datasets = [] if project_id is None else [
        (f"Dataset: {d.name} ({d.num_train} train / {d.num_eval} eval)", f"dataset:{d.id}")
        for d in db.list_datasets(project_id)]
    return samples + datasets


def run_choices(db: Database, project_id: int | None) -> list[tuple[str, int]]:
    """Newest first, so a restarted UI selects the run that is (or was last) training."""
    runs = db.list_runs(project_id) if project_id is not None else []
    return [(f"#{r.id} {r.name} — {r.status}", r.id) for r in runs]


# ---- starting ----
def make_spec(model: str, data: str, method: str, settings: dict[str, Any], options: dict[str, Any]) -> RunSpec:
    kind, _, value = (data or "").partition(":")
    spec = RunSpec(model=model or "default", method=method or "lora", method_settings=dict(settings or {}),
                   dataset_id=int(value) if kind == "dataset" else None,
                   sample_task=value if kind == "sample" else None)
    casts = {f: type(getattr(spec, f)) for f in OPTIONS}
    for name, raw in options.items():
        if raw is not None and raw != "":
            setattr(spec, name, casts[name](raw))
    return spec.validate()


def gpu_free_bytes() -> int | None:
    gpus = sysinfo.probe_accelerators().get("gpus") or []
    return int(gpus[0]["free_bytes"]) if gpus else None


def estimate(model: str, spec: RunSpec, gpu_free: int | None) -> tuple[str, str]:
    """(markdown, verdict) of the planner's memory estimate for this run on this machine."""
    from studio.estimate import TrainSetup
    from studio.planner import arch_for, plan

    on_gpu = gpu_free is not None
    dtype = spec.precision if spec.precision != "auto" else ("bf16" if on_gpu else "fp32")
    setup = TrainSetup(batch_size=spec.batch_size, seq_len=spec.max_length, dtype=dtype,
                       grad_checkpointing=spec.grad_checkpointing, optimizer=spec.optimizer,
                       device="cuda" if on_gpu else "cpu")
    result = plan(arch_for(model), spec.method, spec.method_settings, setup, gpu_free)
    total = result["total_bytes"] / GIB
    head = (f"**Estimated training memory: {total:.2f} GiB** for {result['title']} "
            f"({result['trainable_params']:,} trainable parameters), batch {spec.batch_size} × "
            f"{spec.max_length} tokens, {dtype}")
    if not on_gpu:
        return head + ". No GPU found: training runs on the CPU, in RAM.", result["verdict"]
    return f"{head} — GPU has {gpu_free / GIB:.1f} GiB free: **{result['verdict']}**.", result["verdict"]


def estimate_text(db: Database, project_id: int | None, data: str, method: str, settings: dict[str, Any],
                  options: dict[str, Any]) -> str:
    project = db.get_project(project_id) if project_id is not None else None
    model = project.model_source if project else "default"
    try:
        return estimate(model, make_spec(model, data, method, settings, options), gpu_free_bytes())[0]
    except Exception as exc:  # the estimate is advice; any failure is shown, never raised
        return f"**Cannot estimate:** {exc}"


def start_run(db: Database, project_id: int | None, data: str, method: str, settings: dict[str, Any],
              options: dict[str, Any]) -> tuple[str, int | None]:
    """Create and start a run; (message, run id or None when refused: then nothing was created)."""
    msg = labels.TRAIN_MSG
    project = db.get_project(project_id) if project_id is not None else None
    if project is None:
        return msg["no_project"], None
    with _start_lock:
        try:
            spec = make_spec(project.model_source, data, method, settings, options)
        except (RunSpecError, ValueError, TypeError) as exc:
            return msg["refused"].format(reason=exc), None
        gpu = gpu_free_bytes()
        if gpu is not None:  # on the CPU it is only shown: RAM swaps rather than crashing
            try:
                text, verdict = estimate(project.model_source, spec, gpu)
            except Exception as exc:  # an unreadable model fails in the worker, with its log
                text, verdict = f"(no estimate: {exc})", "unknown"
            if verdict == "exceeds":
                return msg["too_big"].format(estimate=text), None
        busy = launch.active_run(db)
        if busy is not None:
            return msg["refused"].format(reason=msg["busy"].format(id=busy.id, name=busy.name)), None
        run = launch.create_run(db, project.id, spec)
        try:
            launch.start(db, run.id)
        except launch.RunConflict as exc:  # started elsewhere (the CLI) since the check above
            folder = launch.run_folder(db, run)
            db.delete_run(run.id)
            shutil.rmtree(folder, ignore_errors=True)
            return msg["refused"].format(reason=exc), None
    return msg["started"].format(id=run.id, name=run.name), run.id


def stop_run(db: Database, run_id: int | None, mode: str) -> str:
    run = db.get_run(run_id) if run_id is not None else None
    if run is None or run.status != RunStatus.RUNNING.value:
        return labels.TRAIN_MSG["not_running"]
    launch.stop(db, run_id, mode)
    kept = "saving a checkpoint" if mode == "save" else "discarding its checkpoints"
    return labels.TRAIN_MSG["stopping"].format(id=run_id, kept=kept)


def resume_run(db: Database, run_id: int | None) -> str:
    if run_id is None or db.get_run(run_id) is None:
        return labels.TRAIN_MSG["no_resume"]
    with _start_lock:  # the same check-then-start as start_run
        try:
            launch.resume(db, run_id)
        except launch.RunConflict as exc:
            return labels.TRAIN_MSG["not_resumed"].format(reason=exc)
    return labels.TRAIN_MSG["resumed"].format(id=run_id)


# ---- rendering ----
def find_method_settings(demo: gr.Blocks) -> dict[str, gr.components.Component]:
    """The Method tab's setting widgets (elem_id ``param-<name>``), so a run uses what was set there."""
    return {b.elem_id.removeprefix("param-"): b for b in demo.blocks.values()
            if isinstance(getattr(b, "elem_id", None), str) and b.elem_id.startswith("param-")}


def option_elem_id(name: str) -> str:
    """The elem_id of the widget for RunSpec field ``name`` (History's clone fills them in)."""
    return "train-steps" if name == "max_steps" else f"train-{name.replace('_', '-')}"


def find_widgets(demo: gr.Blocks) -> dict[str, gr.components.Component]:
    """The tab's data and method choices (keys "data", "method") and its option widgets (by
    RunSpec field), found by elem_id in a built app."""
    by_id = {b.elem_id: b for b in demo.blocks.values() if isinstance(getattr(b, "elem_id", None), str)}
    found = {"data": by_id.get("train-data"), "method": by_id.get("train-method")}
    found.update({name: by_id.get(option_elem_id(name)) for name in OPTIONS})
    return {k: v for k, v in found.items() if v is not None}


# ---- the tab ----
CHOICES = {"lr_scheduler": list(SCHEDULES[:3]), "precision": list(PRECISIONS)}
MINIMUM = {"batch_size": 1, "grad_accum": 1, "max_length": 16, "seed": None}


def _option(name: str, **extra: Any) -> gr.components.Component:
    """The widget for one RunSpec field: its default, label and help in one place."""
    default = getattr(RunSpec(), name)
    label, info = labels.TRAIN_FIELDS[name]
    if isinstance(default, bool):
        return gr.Checkbox(default, label=label, info=info, **extra)
    if name in CHOICES:
        return gr.Dropdown(CHOICES[name], value=default, label=label, info=info, **extra)
    return gr.Number(default, label=label, info=info, minimum=MINIMUM.get(name, 0),
                     precision=0 if isinstance(default, int) else None, **extra)


def build(demo: gr.Blocks, db: Database, picker: gr.Dropdown, method_dropdown: gr.Dropdown | None = None,
          settings: dict[str, gr.components.Component] | None = None, tab: gr.Tab | None = None
          ) -> Callable[[], gr.Timer]:
    """Render the tab; returns ``attach_timer()``, which app.py calls outside ``gr.Tabs`` (a timer
    inside a tab would not tick until the tab was opened)."""
    from studio.methods import all_methods

    settings = settings or {}
    names, setting_widgets = list(settings), list(settings.values())
    help_ = labels.TRAIN_HELP
    with gr.Row():
        with gr.Column(scale=2):
            data = gr.Dropdown(data_choices(db, None), value=DEFAULT_DATA, label=labels.TRAIN_DATA,
                               info=help_["data"], elem_id="train-data")
            method = gr.Dropdown([(m.title, m.name) for m in all_methods()], value="lora",
                                 label=labels.TRAIN_METHOD, info=help_["method"], elem_id="train-method")
            widgets = {"max_steps": _option("max_steps", elem_id=option_elem_id("max_steps"))}
            with gr.Accordion(labels.TRAIN_ADVANCED, open=False, elem_id="train-advanced"):
                advanced = OPTIONS[1:]  # two a row: the column is narrow (checkbox labels wrap at three)
                for row in range(0, len(advanced), 2):
                    with gr.Row():
                        widgets.update({name: _option(name, elem_id=option_elem_id(name))
                                        for name in advanced[row:row + 2]})
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
            # Short tick labels ("2e-4", "1.2k"): Gradio sizes the axes when a plot is rebuilt.
            common = dict(x="step", y="value", color="series", x_title="step", color_title="")
            loss_plot = gr.LinePlot(label="Loss", y_title="loss", elem_id="train-loss-plot",
                                    color_map={"train loss": "#2563eb", "eval loss": "#f97316"}, **common)
            common.update(colors_in_legend=[], height=260)  # one series each: no legend
            with gr.Row():
                lr_plot = gr.LinePlot(label="Learning rate", y_title="learning rate", y_axis_format="~e",
                                      elem_id="train-lr-plot", **common)
                speed_plot = gr.LinePlot(label="Tokens per second", y_title="tokens/s", y_axis_format="~s",
                                         elem_id="train-speed-plot", **common)
    # Full width below both columns: log lines are long, and wrapped they would not fit the box.
    log = gr.Textbox(label="Worker log (last lines)", lines=LOG_LINES, max_lines=2 * LOG_LINES, interactive=False,
                     autoscroll=True, elem_id="train-log")
    shown = gr.State({"key": None, "choices": None})
    # [run id, mode] of a stop asked for and not yet seen done. Its own state, written only by the
    # stop buttons and cleared only by the poll that saw the run end: kept in ``shown``, a poll
    # already running when Stop is clicked would write its older copy back and lose it.
    stopping = gr.State(None)

    option_widgets = [widgets[name] for name in OPTIONS]
    plan_inputs = [picker, data, method, *option_widgets, *setting_widgets]
    view_outputs = [status, progress, loss_plot, lr_plot, speed_plot, log, summary]

    def read(method_name, rest):
        """(options by RunSpec field, the Method tab's settings for this method)."""
        options, values = dict(zip(OPTIONS, rest[:len(OPTIONS)])), list(rest[len(OPTIONS):])
        try:
            return options, param_widgets.read_settings(method_name, names, values) if names else {}
        except ValueError:  # an unknown method: make_spec reports it
            return options, {}

    def on_estimate(project_id, data_value, method_name, *rest):
        options, chosen = read(method_name, rest)
        return estimate_text(db, project_id, data_value, method_name, chosen, options)

    def on_start(project_id, data_value, method_name, *rest):
        options, chosen = read(method_name, rest)
        text, run_id = start_run(db, project_id, data_value, method_name, chosen, options)
        if run_id is None:
            return text, gr.update()
        return text, gr.update(choices=run_choices(db, project_id), value=run_id)

    def on_select(run_id, state, old_key=None):
        """The selected run's view; parts whose key equals ``old_key`` are not re-sent (a plot
        re-sent every second would redraw every second)."""
        view, (plots, texts) = render_run(db, run_id), old_key or (None, None)
        keep = gr.update()
        new_plots = [gr.update(value=f, x_lim=view.x_lim, y_lim=nice_limits(f["value"]))
                     for f in (view.loss, view.lr, view.speed)]
        return [view.status if view.key[1] != texts else keep, view.progress if view.key[1] != texts else keep,
                *(new_plots if view.key[0] != plots else [keep] * 3),
                *([view.log, view.summary] if view.key[1] != texts else [keep] * 2), {**state, "key": view.key}]

    def poll(project_id, run_id, state, stopping_v=None):
        launch.reconcile(db)  # a worker that died cannot write its own end
        choices = run_choices(db, project_id)
        ids = [c[1] for c in choices]
        selected = run_id if run_id in ids else (ids[0] if ids else None)
        run_update = gr.update()
        if choices != state.get("choices") or selected != run_id:
            run_update = gr.update(choices=choices, value=selected)
        outputs = [run_update, *on_select(selected, {"choices": choices}, state.get("key"))]
        # "Stopping run #N..." becomes what happened once the run has stopped.
        stopped = db.get_run(stopping_v[0]) if stopping_v else None
        if stopping_v and (stopped is None or stopped.status != RunStatus.RUNNING.value):
            done = labels.TRAIN_MSG["stopped"][stopping_v[1]].format(
                id=stopping_v[0], status=stopped.status if stopped else "deleted")
            return [*outputs, done, None]
        return [*outputs, gr.update(), gr.skip()]

    def on_stop(run_id, pending, mode):
        run = db.get_run(run_id) if run_id is not None else None
        was_running = run is not None and run.status == RunStatus.RUNNING.value
        return stop_run(db, run_id, mode), [run_id, mode] if was_running else pending

    def refresh_data(project_id, current):
        choices = data_choices(db, project_id)
        value = current if current in [c[1] for c in choices] else DEFAULT_DATA
        return gr.update(choices=choices, value=value)

    estimate_triggers = [data.change, method.change, picker.change] + [
        widgets[name].change for name in ("batch_size", "max_length", "grad_checkpointing", "precision")]
    for trigger in estimate_triggers:
        trigger(on_estimate, plan_inputs, [estimate_md], api_name=False, show_progress="hidden")
    start.click(on_start, plan_inputs, [message, run_dd], api_name=False).then(
        on_select, [run_dd, shown], [*view_outputs, shown], api_name=False, show_progress="hidden")
    stop.click(lambda rid, p: on_stop(rid, p, "save"), [run_dd, stopping], [message, stopping], api_name=False)
    discard.click(lambda rid, p: on_stop(rid, p, "discard"), [run_dd, stopping], [message, stopping],
                  api_name=False)
    resume.click(lambda rid: resume_run(db, rid), [run_dd], [message], api_name=False)
    run_dd.input(on_select, [run_dd, shown], [*view_outputs, shown], api_name=False, show_progress="hidden")
    picker.change(refresh_data, [picker, data], [data], api_name=False)
    demo.load(refresh_data, [picker, data], [data], api_name=False).then(
        on_estimate, plan_inputs, [estimate_md], api_name=False)
    if tab is not None:  # datasets imported and settings changed in other tabs show on opening it
        tab.select(refresh_data, [picker, data], [data], api_name=False).then(
            on_estimate, plan_inputs, [estimate_md], api_name=False, show_progress="hidden")
    if method_dropdown is not None:
        # One method for both tabs: follow the Method tab; a choice here is sent back there
        # (``.input`` fires for user changes only, so the two never ping-pong).
        method_dropdown.change(lambda m: m, [method_dropdown], [method], api_name=False)
        method.input(lambda m: m, [method], [method_dropdown], api_name=False)

    def attach_timer() -> gr.Timer:
        timer = gr.Timer(1.0)
        timer.tick(poll, [picker, run_dd, shown, stopping], [run_dd, *view_outputs, shown, message, stopping],
                   api_name=False,
                   show_progress="hidden", concurrency_limit=None)
        return timer

    return attach_timer
