"""The Method tab: pick a method and its settings; see the exact trainable count, its formula
and the training-memory estimate (stacked by term) update live; ask the advisor.

A view of the session's run draft (``studio.ui.draft``), like the Train tab: the method, its
settings and the training setup (batch, length, precision, checkpointing, optimizer) edited here
are the run's. The model, base quantisation and GPU memory figure are planning data in the draft.
The estimate goes through ``run_setup.training_setup``, the translation the run itself uses.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd

from studio import config, run_setup, sysinfo
from studio.advisor import Constraints, recommend
from studio.methods import all_methods, get_method
from studio.planner import arch_for
from studio.runspec import OPTIMIZERS, PRECISIONS
from studio.ui import estimates, labels, param_widgets
from studio.ui.draft import QUANTS, RunDraft
from studio.ui.wiring import DraftView, edits

GIB = 2**30
TXT = labels.METHOD
# The training settings this tab shows, by RunSpec field, with their elem_ids.
SETUP_IDS = {"batch_size": "setup-batch", "max_length": "setup-seq", "precision": "setup-precision",
             "grad_checkpointing": "setup-ckpt", "optimizer": "setup-optimizer"}


@dataclass
class MethodHandles:
    """What app.py wires: the tab's redraw from the draft (run on opening it and after a clone)."""
    view: DraftView


def local_gpu_gib() -> float | None:
    """This machine's free GPU memory in GiB (the Method tab's default plan), None without a GPU."""
    gpus = sysinfo.probe_accelerators().get("gpus") or []
    return round(gpus[0]["free_bytes"] / GIB, 1) if gpus else None


def arch_summary(source: str) -> str:
    arch = arch_for(source)
    return (f"**{arch.architecture}** · {arch.total_params:,} parameters · d = {arch.hidden_size}, "
            f"L = {arch.num_layers}, heads {arch.num_heads} (KV {arch.num_kv_heads}), head dim "
            f"{arch.head_dim}, MLP {arch.intermediate_size}, vocab {arch.vocab_size:,}"
            f"{', tied embeddings' if arch.tie_word_embeddings else ''}  \n"
            f"Targetable layers: {', '.join(arch.target_leaves)}")


def method_card(name: str) -> str:
    spec = get_method(name)
    text = TXT["card"].format(title=spec.title, family=spec.family, merge="yes" if spec.mergeable else "no",
                              overhead=spec.inference_overhead, guidance=spec.guidance)
    return text + (f"  \n*{spec.notes}*" if spec.notes else "")


def memory_frame(result: dict[str, Any]) -> pd.DataFrame:
    rows = [{"estimate": "training", "term": name, "GiB": round(value / GIB, 4)}
            for name, value in result["memory_bytes"].items() if value > 0]
    return pd.DataFrame(rows, columns=["estimate", "term", "GiB"])


def evaluate(draft: RunDraft, here: run_setup.DeviceFacts | None = None):
    """Everything the right-hand side shows for the draft: (count, formula, bar frame, total)."""
    try:
        here = here or run_setup.device_facts(draft.model)
        device = estimates.planned_device(draft, here)
        result, choice = estimates.plan_draft(draft, draft.model, device, draft.quant)
    except Exception as exc:  # advice: a bad setting or an unreadable model is shown, never raised
        return TXT["cannot_estimate"].format(reason=exc), "", memory_frame({"memory_bytes": {}}), ""
    count = TXT["count"].format(params=result["trainable_params"], percent=result["trainable_percent"],
                                total=result["total_params"])
    terms = "  \n".join(f"**{name}** {value / GIB:.3f} GiB: {result['memory_formulas'][name]}"
                        for name, value in result["memory_bytes"].items())
    budget, where = run_setup.memory_budget(device)
    verdict = TXT["verdicts"][result["verdict"]].format(budget=(budget or 0) / GIB, where=where)
    notes = estimates.fit_notes(draft, draft.model, device, result, draft.quant)
    if where == "RAM" and result["verdict"] == "exceeds":
        notes.insert(0, TXT["ram_exceeds"])
    if where == "RAM" and get_method(draft.spec.method).quantized:
        notes.append(TXT["cpu_4bit"].format(version=_bnb_version()))
    total = TXT["total"].format(gib=result["total_bytes"] / GIB, verdict=verdict, precision=choice.precision,
                                why=choice.reason, notes="".join(n + "  \n" for n in notes), terms=terms)
    return count, f"`{result['formula']}`", memory_frame(result), total


def _bnb_version() -> str:
    """The installed bitsandbytes' version, read from its metadata (importing it loads torch)."""
    from importlib import metadata

    try:
        return metadata.version("bitsandbytes")
    except metadata.PackageNotFoundError:
        return "not installed"


def build(demo: gr.Blocks, draft: gr.State) -> MethodHandles:
    # Warm the default model's ArchInfo in the background (a child process the first time).
    threading.Thread(target=lambda: _safe(arch_summary, config.DEFAULT_MODEL), daemon=True).start()
    start = RunDraft()
    with gr.Row():
        with gr.Column(scale=2):
            with gr.Row(equal_height=True):
                source = gr.Textbox(value=start.model, label=TXT["model"], scale=3, elem_id="method-model",
                                    info=TXT["model_help"])
                load = gr.Button(TXT["read_model"], scale=1, size="sm", elem_id="method-model-load")
            model_info = gr.Markdown(elem_id="method-model-info")
            method = gr.Dropdown(choices=[(m.title, m.name) for m in all_methods()], value=start.spec.method,
                                 label=TXT["method"], elem_id="method-choice")
            card = gr.Markdown(method_card(start.spec.method), elem_id="method-card")
            widgets = param_widgets.build()
            with gr.Accordion(TXT["setup"], open=True, elem_id="method-setup"):
                setup = _setup_widgets(start)
                with gr.Row():
                    quant = gr.Dropdown(list(QUANTS), value=start.quant, label=TXT["quant"], info=TXT["quant_help"],
                                        elem_id="setup-quant")
                    gpu_gib = gr.Number(value=local_gpu_gib() or 0, label=TXT["gpu"], info=TXT["gpu_help"],
                                        minimum=0, elem_id="setup-gpu")
        with gr.Column(scale=3):
            count = gr.Markdown(elem_id="method-count")
            formula = gr.Markdown(elem_id="method-formula")
            bar = gr.BarPlot(x="estimate", y="GiB", color="term", label=TXT["bar"], elem_id="memory-bar", height=220)
            total = gr.Markdown(elem_id="memory-total")
            _advisor(draft)

    names = list(widgets)
    outputs = [count, formula, bar, total]

    def refresh(current: RunDraft):
        return evaluate(current)

    def redraw(current: RunDraft):
        """Every widget of the tab as the draft says (the method's own settings shown)."""
        spec = current.spec
        return [current.model, spec.method, method_card(spec.method),
                *param_widgets.show_method(get_method(spec.method), names, spec.method_settings),
                *(getattr(spec, name) for name in SETUP_IDS), current.quant, current.gpu_gib or 0]

    redraw_outputs = [source, method, card, *widgets.values(), *setup.values(), quant, gpu_gib]
    view = DraftView(redraw, [draft], redraw_outputs, then=[(refresh, [draft], outputs)])

    def estimate_after(event):
        event.success(refresh, [draft], outputs, api_name=False, show_progress="hidden")

    # A user's choice of method shows that method's defaults (its settings in the draft are reset).
    edits(method, lambda d, m: d.with_method(m), draft).success(
        lambda d: [method_card(d.spec.method), *param_widgets.show_method(get_method(d.spec.method), names,
                                                                          d.spec.method_settings)],
        [draft], [card, *widgets.values()], api_name=False, show_progress="hidden").then(
        refresh, [draft], outputs, api_name=False, show_progress="hidden")
    for name, widget in widgets.items():
        estimate_after(edits(widget, lambda d, v, n=name: d.with_setting(n, v), draft))
    for name, widget in setup.items():
        estimate_after(edits(widget, lambda d, v, n=name: d.with_field(n, v), draft))
    estimate_after(edits(quant, lambda d, q: d.with_plan(quant=q), draft))
    estimate_after(edits(gpu_gib, lambda d, g: d.with_plan(gpu_gib=g), draft))
    edits(source, lambda d, s: d.with_plan(model=s), draft)  # read on "Read model": not per keystroke
    load.click(lambda s: _safe(arch_summary, s), [source], [model_info], api_name=False).then(
        refresh, [draft], outputs, api_name=False)
    source.submit(lambda s: _safe(arch_summary, s), [source], [model_info], api_name=False).then(
        refresh, [draft], outputs, api_name=False)
    demo.load(lambda s: _safe(arch_summary, s), [source], [model_info], api_name=False)
    return MethodHandles(view)


def _setup_widgets(start: RunDraft) -> dict[str, gr.components.Component]:
    spec, train = start.spec, labels.TRAIN_FIELDS
    with gr.Row():
        batch = gr.Number(value=spec.batch_size, label=train["batch_size"][0], minimum=1, precision=0,
                          elem_id=SETUP_IDS["batch_size"])
        seq = gr.Number(value=spec.max_length, label=train["max_length"][0], minimum=16, precision=0,
                        elem_id=SETUP_IDS["max_length"])
    with gr.Row():
        precision = gr.Dropdown(list(PRECISIONS), value=spec.precision, label=train["precision"][0],
                                elem_id=SETUP_IDS["precision"])
        optimizer = gr.Dropdown(list(OPTIMIZERS), value=spec.optimizer, label=TXT["optimizer"],
                                info=TXT["optimizer_help"], elem_id=SETUP_IDS["optimizer"])
    ckpt = gr.Checkbox(spec.grad_checkpointing, label=train["grad_checkpointing"][0],
                       info=train["grad_checkpointing"][1], elem_id=SETUP_IDS["grad_checkpointing"])
    return {"batch_size": batch, "max_length": seq, "precision": precision, "grad_checkpointing": ckpt,
            "optimizer": optimizer}


def _safe(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # a missing folder, a bad config, no network for a hub id
        return TXT["cannot_read"].format(reason=exc)


def short_count(n: int) -> str:
    """A trainable count that fits a narrow column: 4.9M, 58k, 512 (the Method tab's headline
    gives the exact count)."""
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e3 else str(n)


def _advisor(draft: gr.State) -> None:
    with gr.Accordion(TXT["advisor"], open=False, elem_id="advisor"):
        with gr.Row():
            examples = gr.Number(value=1000, label=TXT["examples"], precision=0, minimum=1)
            must_merge = gr.Checkbox(False, label=TXT["must_merge"])
            many_tasks = gr.Checkbox(False, label=TXT["many_tasks"])
            quality = gr.Checkbox(False, label=TXT["quality"])
        ask = gr.Button(TXT["rank"], elem_id="advisor-run")
        # Fixed shares of the width, the reasons the widest: sized by content, the long reasons
        # pushed the verdict column out of the panel.
        table = gr.Dataframe(headers=TXT["advisor_columns"], interactive=False, elem_id="advisor-table", wrap=True,
                             column_widths=["17%", "11%", "36%", "13%", "9%", "14%"])

    def run(current: RunDraft, n, merge, many, qual):
        device = estimates.planned_device(current, run_setup.device_facts(current.model))
        choice = run_setup.training_setup(current.spec, device)
        budget, where = run_setup.memory_budget(device)
        constraints = Constraints(memory_bytes=budget, where=where, examples=int(n or 1), must_merge=merge,
                                  many_tasks=many, quality_first=qual)
        rows = recommend(arch_for(current.model), constraints, choice.setup)
        return [[r.title, r.score, r.reasons, short_count(r.trainable_params), f"{r.total_bytes / GIB:.1f}", r.verdict]
                for r in rows]

    ask.click(run, [draft, examples, must_merge, many_tasks, quality], [table], api_name="advisor")
