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

import html
import math
import shutil
import statistics
import threading
from dataclasses import dataclass
from typing import Any, Callable

import gradio as gr
import pandas as pd

from studio import sysinfo
from studio.db import Database, Run, RunStatus
from studio.runspec import SCHEDULES, PRECISIONS, RunSpec, RunSpecError
from studio.samples import SAMPLE_TASKS
from studio.ui import labels, param_widgets
from studio.worker import launch

GIB = 2**30
LOG_LINES = 12
# The option widgets, in order, by the RunSpec field each one sets.
OPTIONS = ("max_steps", "epochs", "batch_size", "grad_accum", "learning_rate", "lr_scheduler",
           "max_length", "packing", "grad_checkpointing", "precision", "seed", "eval_steps",
           "exact_match_limit")
LOSS_SERIES = {"loss": "train loss", "eval_loss": "eval loss"}
LR_SERIES = {"learning_rate": "learning rate"}
SPEED_SERIES = {"tokens_per_s": "tokens/s"}
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
@dataclass
class RunView:
    run: Run | None
    status: str
    progress: str
    loss: pd.DataFrame
    lr: pd.DataFrame
    speed: pd.DataFrame
    log: str
    summary: str
    x_lim: list[float]  # the whole run's steps: the curve grows into a fixed axis
    key: tuple  # (plots key, text key): the poll re-sends only the part that changed


def frame(points: dict[str, list[tuple[int, float]]], series: dict[str, str]) -> pd.DataFrame:
    """Long-format frame for a LinePlot, holding every series from the first frame on.

    Gradio's plot fixes its colour domain and axis types when it first draws: a series that
    appears later (eval loss) gets no colour, an int column becomes categories. So: floats always,
    and a series without points yet is one NaN row (not drawn, but in the legend and the domain)."""
    rows = [(float(step), value if math.isfinite(value) else math.nan, label)
            for name, label in series.items() for step, value in points.get(name, [])]
    first = rows[0][0] if rows else 0.0
    rows += [(first, math.nan, label) for name, label in series.items() if not points.get(name)]
    return pd.DataFrame({"step": pd.Series([r[0] for r in rows], dtype=float),
                         "value": pd.Series([r[1] for r in rows], dtype=float),
                         "series": pd.Series([r[2] for r in rows], dtype=str)})


def nice_limits(values: pd.Series) -> list[float] | None:
    """Y limits rounded outward to the data's order of magnitude. Gradio's plot lays out its axes
    (label widths, titles) only when it is rebuilt, which a change of limits does, not new data:
    with limits that change only when the labels would, the axes never end up clipped."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None
    lo, hi = min(finite), max(finite)
    span = (hi - lo) or abs(hi) * 0.1 or 1.0
    step = 10.0 ** math.floor(math.log10(span))
    lo = math.floor(round((lo - span / 20) / step, 6)) * step  # 5 % margin; round(): 0.56 / 0.01
    hi = math.ceil(round((hi + span / 20) / step, 6)) * step  # is 56.00000000000001
    return [float(f"{lo if lo >= 0 or min(finite) < 0 else 0.0:.6g}"), float(f"{hi:.6g}")]


def clean_log(db: Database, run: Run, lines: int = 12, width: int = 160) -> str:
    """The log's last lines as a terminal shows them: a progress bar redraws its line after a
    carriage return, so only the text after a line's last one is kept (``launch.log_tail``
    splits at every carriage return, which would fill the box with progress-bar frames)."""
    try:
        with open(launch.run_folder(db, run) / launch.LOG_NAME, "rb") as fh:
            fh.seek(max(0, fh.seek(0, 2) - 64_000))
            raw = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    shown = [line.rsplit("\r", 1)[-1].rstrip()[:width] for line in raw.split("\n")]
    return "\n".join([line for line in shown if line.strip()][-lines:])


def total_steps(db: Database, run: Run) -> int | None:
    """Max steps, or the steps of the epochs (unknown with packing, or before the sample is imported)."""
    spec = RunSpec.from_dict(run.spec)
    dataset = db.get_dataset(run.dataset_id) if run.dataset_id is not None else None
    if spec.max_steps > 0 or dataset is None or not dataset.num_train or spec.packing:
        return spec.max_steps if spec.max_steps > 0 else None
    return math.ceil(spec.epochs * math.ceil(dataset.num_train / (spec.batch_size * spec.grad_accum)))


def seconds_per_step(elapsed: list[tuple[int, float]]) -> float | None:
    """Median over the last twenty steps: an evaluation between two steps (minutes on a CPU) or
    the first step's warm-up would throw a mean off; a resume restarts the clock (skipped)."""
    window = elapsed[-21:]
    rates = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(window, window[1:]) if b[1] > a[1] and b[0] > a[0]]
    return statistics.median(rates) if rates else None


def duration(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    return f"{s // 3600} h {s % 3600 // 60} min" if s >= 3600 else f"{s // 60} min {s % 60} s" if s >= 60 else f"{s} s"


def progress_html(step: int, total: int | None, eta: float | None, status: str) -> str:
    share = min(1.0, step / total) if total else 0.0
    text = f"Step {step} / {total if total else '?'}" + (f" ({share:.0%})" if total else "")
    right = status if status != RunStatus.RUNNING.value else (
        "final evaluation…" if total and step >= total else "starting…" if step == 0
        else f"ETA {duration(eta)}" if eta is not None else "estimating the time left…")
    return (f'<div class="train-progress-text" style="display:flex;justify-content:space-between">'
            f"<span>{text}</span><span>{html.escape(right)}</span></div>"
            '<div style="background:var(--neutral-200,#e5e7eb);border-radius:6px;height:14px">'
            f'<div style="width:{share * 100:.1f}%;height:14px;border-radius:6px;'
            'background:var(--color-accent,#f97316)"></div></div>')


RESULTS = (("loss", "final train loss", ".4f"), ("eval_loss", "eval loss", ".4f"),
           ("eval_exact_match", "eval exact match", ".1%"))


def summary_markdown(run: Run, points: dict[str, list[tuple[int, float]]], step: int, total: int | None) -> str:
    rows = [(label, f"{points[name][-1][1]:{fmt}}" if points.get(name) else "—") for name, label, fmt in RESULTS]
    rows.append(("steps", f"{step} / {total}" if total else str(step)))
    if run.started_at and run.finished_at:
        rows.append(("duration", duration((run.finished_at - run.started_at).total_seconds())))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    text = f"### Run #{run.id} {run.status}\n| result | value |\n|---|---|\n{table}"
    return text + (f"\n\n**What went wrong:**\n```\n{run.error.strip()}\n```" if run.error else "")


def render_run(db: Database, run_id: int | None) -> RunView:
    """Everything the tab shows for one run, read from the database and the run's log."""
    run = db.get_run(run_id) if run_id is not None else None
    if run is None:
        return RunView(None, labels.TRAIN_NO_RUN, "", frame({}, LOSS_SERIES), frame({}, LR_SERIES),
                       frame({}, SPEED_SERIES), "", "", [0.0, 1.0], (None, None))
    points: dict[str, list[tuple[int, float]]] = {}
    for metric in db.metrics_for(run.id):
        points.setdefault(metric.name, []).append((metric.step, metric.value))
    step = points["loss"][-1][0] if points.get("loss") else 0
    total = total_steps(db, run)
    per_step = seconds_per_step(points.get("elapsed_s", []))
    eta = per_step * max(0, total - step) if per_step is not None and total else None
    running = run.status == RunStatus.RUNNING.value
    status = f"**#{run.id} {html.escape(run.name)}** — {run.status}"
    if running:
        status += f" (worker pid {run.pid})" + (" — stopping…" if run.cancel_request else "")
        if not points:
            status += f"  \n{labels.TRAIN_PREPARING}"
        evals = [f"{label} {points[name][-1][1]:{fmt}} (step {points[name][-1][0]})"
                 for name, label, fmt in RESULTS[1:] if points.get(name)]
        if evals:  # one eval point draws no line yet: say it in words
            status += "  \nLatest " + " · ".join(evals)
    log = clean_log(db, run, LOG_LINES)
    finished = run.status not in (RunStatus.RUNNING.value, RunStatus.QUEUED.value)
    summary = summary_markdown(run, points, step, total) if finished else ""
    plots_key = (run.id, sum(len(v) for v in points.values()))
    key = (plots_key, (plots_key, status, run.status, log[-300:]))
    return RunView(run, status, progress_html(step, total, eta, run.status),
                   frame(points, LOSS_SERIES), frame(points, LR_SERIES), frame(points, SPEED_SERIES),
                   log, summary, [0.0, float(max(total or 0, step, 1))], key)


def find_method_settings(demo: gr.Blocks) -> dict[str, gr.components.Component]:
    """The Method tab's setting widgets (elem_id ``param-<name>``), so a run uses what was set there."""
    return {b.elem_id.removeprefix("param-"): b for b in demo.blocks.values()
            if isinstance(getattr(b, "elem_id", None), str) and b.elem_id.startswith("param-")}


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
            widgets = {"max_steps": _option("max_steps", elem_id="train-steps")}
            with gr.Accordion(labels.TRAIN_ADVANCED, open=False, elem_id="train-advanced"):
                advanced = OPTIONS[1:]  # two a row: the column is narrow (checkbox labels wrap at three)
                for row in range(0, len(advanced), 2):
                    with gr.Row():
                        widgets.update({name: _option(name) for name in advanced[row:row + 2]})
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

    def poll(project_id, run_id, state):
        launch.reconcile(db)  # a worker that died cannot write its own end
        choices = run_choices(db, project_id)
        ids = [c[1] for c in choices]
        selected = run_id if run_id in ids else (ids[0] if ids else None)
        run_update = gr.update()
        if choices != state.get("choices") or selected != run_id:
            run_update = gr.update(choices=choices, value=selected)
        return [run_update, *on_select(selected, {"choices": choices}, state.get("key"))]

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
    stop.click(lambda rid: stop_run(db, rid, "save"), [run_dd], [message], api_name=False)
    discard.click(lambda rid: stop_run(db, rid, "discard"), [run_dd], [message], api_name=False)
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
        timer.tick(poll, [picker, run_dd, shown], [run_dd, *view_outputs, shown], api_name=False,
                   show_progress="hidden", concurrency_limit=None)
        return timer

    return attach_timer
