"""What the Train tab shows for one run, computed from the database and the run's log alone:
plot frames, axis limits, progress with ETA, the summary and the log tail (``render_run``).

Kept apart from the tab's widgets and handlers so a restarted UI, a test or another tab can
render a run without building any Gradio component.

While the worker evaluates (``Run.activity``, written with its heartbeat) the progress shows
"evaluating" with a bar of its own (eval-loss batches, then exact-match answers), and the ETA
counts the evaluations still to come at the duration the last ones took (``eval_seconds``):
a mid-training evaluation on a CPU can take longer than all the steps between two of them.
"""

from __future__ import annotations

import html
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

import pandas as pd

from studio.db import Database, Run, RunStatus
from studio.runspec import RunSpec
from studio.trackers.choice import run_places
from studio.ui import labels
from studio.runs import launch, outcome
from studio.worker.precision_record import describe, read_record

LOG_LINES = 12
LOSS_SERIES = {"loss": "train loss", "eval_loss": "eval loss"}
LR_SERIES = {"learning_rate": "learning rate"}
SPEED_SERIES = {"tokens_per_s": "tokens/s"}
TEXT = labels.TRAIN_VIEW


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
    and a series without points yet is one NaN row (not drawn, but in the legend and the domain).

    A series with a single point (one evaluation so far) would draw nothing: a line mark needs two
    points and Gradio 6 has no point markers. It is drawn as a short flat dash at its value,
    ±1 % of the plot's step range (at least half a step) around its step."""
    rows = [(float(step), value if math.isfinite(value) else math.nan, label)
            for name, label in series.items() for step, value in points.get(name, [])]
    last = max((r[0] for r in rows), default=0.0)
    half = max(0.5, 0.01 * last)
    for name, label in series.items():
        finite = [(step, value) for step, value in points.get(name, []) if math.isfinite(value)]
        if len(finite) == 1:
            (step, value), = finite
            rows += [(float(step) - half, value, label), (float(step) + half, value, label)]
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


def activity_text(activity: dict[str, Any] | None) -> str:
    """The worker's current activity in words ("evaluating at step 20: exact match, answer 12
    of 50"), or "" while it trains steps."""
    if not activity:
        return ""
    phase = activity.get("phase")
    if phase == "evaluating":
        part = TEXT["parts"].get(activity.get("part"), activity.get("part"))
        if activity.get("total"):
            return TEXT["evaluating"].format(step=activity.get("step", "?"), part=part,
                                             done=activity.get("done", 0), total=activity["total"])
        return TEXT["evaluating_start"].format(step=activity.get("step", "?"))
    return TEXT.get(phase, "") if phase in ("preparing", "finishing") else ""


def _bar(share: float, height: int, colour: str) -> str:
    return ('<div style="background:var(--neutral-200,#e5e7eb);border-radius:6px;'
            f'height:{height}px;margin-top:2px"><div style="width:{share * 100:.1f}%;height:{height}px;'
            f'border-radius:6px;background:{colour}"></div></div>')


def progress_html(step: int, total: int | None, eta: float | None, status: str,
                  activity: dict[str, Any] | None = None, eta_note: str = "") -> str:
    """The step bar with its ETA, and while the worker evaluates, a second bar for that."""
    share = min(1.0, step / total) if total else 0.0
    text = f"Step {step} / {total if total else '?'}" + (f" ({share:.0%})" if total else "")
    doing = activity_text(activity) if status == RunStatus.RUNNING.value else ""
    evaluating = bool(activity) and activity.get("phase") == "evaluating" and bool(doing)
    timed = f"ETA {duration(eta)}{eta_note}" if eta is not None else ""
    right = status if status != RunStatus.RUNNING.value else (
        doing if doing and not evaluating else
        timed if evaluating and timed else "final evaluation…" if total and step >= total and not evaluating
        else "starting…" if step == 0 and not evaluating else timed or "estimating the time left…")
    out = (f'<div class="train-progress-text" style="display:flex;justify-content:space-between">'
           f"<span>{text}</span><span>{html.escape(right)}</span></div>"
           + _bar(share, 14, "var(--color-accent,#f97316)"))
    if evaluating:
        done, all_ = activity.get("done") or 0, activity.get("total") or 0
        out += (f'<div class="train-eval-progress" style="margin-top:6px">{html.escape(doing)}</div>'
                + _bar(min(1.0, done / all_) if all_ else 0.0, 8, "var(--color-accent-soft,#fdba74)"))
    return out


def evaluations_left(spec: RunSpec, step: int, total: int | None, evaluates: bool) -> int:
    """Evaluations still to come after ``step``: every ``eval_steps`` up to the last step, plus
    the final one the worker runs after training (when the run has an eval split) unless the
    last step is itself an eval step (the worker then keeps that evaluation as the final one)."""
    if not evaluates or not total:
        return 0
    periodic = (total // spec.eval_steps - step // spec.eval_steps) if spec.eval_steps > 0 else 0
    final = 0 if spec.eval_steps > 0 and total % spec.eval_steps == 0 else 1
    return max(0, periodic) + final


def time_left(per_step: float | None, steps_left: int, evals_left: int, eval_seconds: list[float],
              activity: dict[str, Any] | None, now: float) -> tuple[float | None, str]:
    """(seconds left, a note) for the ETA: the steps at the recent pace, the evaluations to come
    at the mean duration of those done, and what remains of the one running now. With no
    evaluation timed yet the note says how many are not counted, rather than hiding them."""
    if per_step is None and steps_left > 0:
        return None, ""
    seconds = (per_step or 0.0) * steps_left
    evaluating = bool(activity) and activity.get("phase") == "evaluating"
    if not eval_seconds:
        pending = evals_left + (1 if evaluating else 0)
        return seconds, TEXT["untimed"].format(n=pending) if pending else ""
    typical = statistics.fmean(eval_seconds)
    seconds += typical * evals_left
    if evaluating:
        seconds += max(0.0, typical - (now - float(activity.get("since") or now)))
    return seconds, ""


def _evaluates(db: Database, run: Run, spec: RunSpec, points: dict[str, list]) -> bool:
    """Whether the run evaluates at all: it has, or it has an eval split to do it on."""
    if points.get("eval_seconds") or points.get("eval_loss") or spec.sample_task:
        return True
    dataset = db.get_dataset(run.dataset_id) if run.dataset_id is not None else None
    return bool(dataset is not None and dataset.num_eval)


RESULTS = (("loss", "final train loss", ".4f"), ("eval_loss", "eval loss", ".4f"),
           ("eval_exact_match", "eval exact match", ".1%"))


def precision_line(db: Database, run: Run) -> str:
    """Which precision the worker chose and why (``precision.json``), or "" before it decided."""
    try:
        record = read_record(launch.run_folder(db, run))
    except (OSError, ValueError):  # a project folder gone or renamed: nothing to say
        record = None
    return describe(record) if record else ""


def tracker_lines(db: Database, run: Run) -> str:
    """Where a run's tracker copies are and the command that shows each (empty without any)."""
    names = (run.spec or {}).get("trackers") or []
    project = db.get_project(run.project_id) if names else None
    if project is None:
        return ""
    return "".join("  \n" + labels.TRAIN_TRACKER_LOGS.format(title=title, where=where, view=view,
                                                             note=f" ({note})" if note else "")
                   for title, where, view, note in run_places(project, run, names))


def summary_markdown(run: Run, points: dict[str, list[tuple[int, float]]], step: int, total: int | None,
                     precision: str = "", status: str | None = None) -> str:
    """The finished run's results table; ``status``: its status in words (``outcome``)."""
    status = status or run.status
    rows = [(label, f"{points[name][-1][1]:{fmt}}" if points.get(name) else "—") for name, label, fmt in RESULTS]
    rows.append(("steps", f"{step} / {total}" if total else str(step)))
    if run.started_at and run.finished_at:
        rows.append(("duration", duration((run.finished_at - run.started_at).total_seconds())))
    if precision:
        rows.append(("precision", precision.replace("|", "/")))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    text = f"### Run #{run.id} {status}\n| result | value |\n|---|---|\n{table}"
    return text + (f"\n\n**What went wrong:**\n```\n{run.error.strip()}\n```" if run.error else "")


def resumed_message(run_id: int, point: Any, stop: str | None) -> str:
    """What a Resume did: continued from ``point`` (``outcome.resume_point`` read before the
    resume) or started again at step 0; ``stop``: ``outcome.stop_kind`` of the run before."""
    if point is not None:
        return TEXT["resumed"].format(id=run_id, step=point.step)
    return TEXT["restarted"].format(id=run_id, why=TEXT["restart_why"].get(stop, ""))


def render_run(db: Database, run_id: int | None, now: float | None = None) -> RunView:
    """Everything the tab shows for one run, read from the database and the run's log
    (``now``: the wall clock, for the time spent in the current evaluation)."""
    run = db.get_run(run_id) if run_id is not None else None
    if run is None:
        return RunView(None, labels.TRAIN_NO_RUN, "", frame({}, LOSS_SERIES), frame({}, LR_SERIES),
                       frame({}, SPEED_SERIES), "", "", [0.0, 1.0], (None, None))
    points: dict[str, list[tuple[int, float]]] = {}
    for metric in db.metrics_for(run.id):
        points.setdefault(metric.name, []).append((metric.step, metric.value))
    step = points["loss"][-1][0] if points.get("loss") else 0
    total = total_steps(db, run)
    running = run.status == RunStatus.RUNNING.value
    activity = run.activity if running else None
    eta, eta_note = None, ""
    if total:
        spec = RunSpec.from_dict(run.spec)
        eta, eta_note = time_left(seconds_per_step(points.get("elapsed_s", [])), max(0, total - step),
                                  evaluations_left(spec, step, total, _evaluates(db, run, spec, points)),
                                  [v for _, v in points.get("eval_seconds", [])], activity,
                                  time.time() if now is None else now)
    words = run.status if running else outcome.status_words(db, run)
    status = f"**#{run.id} {html.escape(run.name)}** — {html.escape(words)}"
    if running:
        status += f" (worker pid {run.pid})" + (" — stopping…" if run.cancel_request else "")
        if activity_text(activity):
            status += f"  \n{html.escape(activity_text(activity))}"
        elif not points:
            status += f"  \n{labels.TRAIN_PREPARING}"
        evals = [f"{label} {points[name][-1][1]:{fmt}} (step {points[name][-1][0]})"
                 for name, label, fmt in RESULTS[1:] if points.get(name)]
        if evals:  # one eval point draws no line yet: say it in words
            status += "  \nLatest " + " · ".join(evals)
    precision = precision_line(db, run)
    if running and precision:
        status += f"  \n{html.escape(precision)}"
    status += tracker_lines(db, run)
    log = clean_log(db, run, LOG_LINES)
    finished = run.status not in (RunStatus.RUNNING.value, RunStatus.QUEUED.value)
    summary = summary_markdown(run, points, step, total, precision, words) if finished else ""
    plots_key = (run.id, sum(len(v) for v in points.values()))
    progress = progress_html(step, total, eta, run.status, activity, eta_note)
    key = (plots_key, (plots_key, status, progress, run.status, log[-300:]))
    return RunView(run, status, progress,
                   frame(points, LOSS_SERIES), frame(points, LR_SERIES), frame(points, SPEED_SERIES),
                   log, summary, [0.0, float(max(total or 0, step, 1))], key)
