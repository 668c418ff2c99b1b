"""The Method tab: pick a method and its settings; see the exact trainable count, its formula
and the training-memory estimate (stacked by term) update live; ask the advisor."""

from __future__ import annotations

import threading
from typing import Any

import gradio as gr
import pandas as pd

from studio import config, sysinfo
from studio.advisor import Constraints, recommend
from studio.estimate import TrainSetup
from studio.methods import SettingError, all_methods, get_method
from studio.models import ModelSourceError
from studio.planner import arch_for, plan
from studio.ui import param_widgets

GIB = 2**30
VERDICT_TEXT = {"fits": "fits", "tight": "tight: close to the limit", "exceeds": "exceeds the GPU",
                "unknown": "no GPU memory given: enter the GPU you plan to train on"}


def _gpu_gib_default() -> float:
    gpus = sysinfo.probe_accelerators().get("gpus") or []
    return round(gpus[0]["free_bytes"] / GIB, 1) if gpus else 0.0


def arch_summary(source: str) -> str:
    arch = arch_for(source)
    return (f"**{arch.architecture}** · {arch.total_params:,} parameters · d = {arch.hidden_size}, "
            f"L = {arch.num_layers}, heads {arch.num_heads} (KV {arch.num_kv_heads}), head dim "
            f"{arch.head_dim}, MLP {arch.intermediate_size}, vocab {arch.vocab_size:,}"
            f"{', tied embeddings' if arch.tie_word_embeddings else ''}  \n"
            f"Targetable layers: {', '.join(arch.target_leaves)}")


def method_card(name: str) -> str:
    spec = get_method(name)
    merge = "yes" if spec.mergeable else "no"
    return (f"**{spec.title}** — {spec.family} · merges into the base: {merge} · inference "
            f"overhead: {spec.inference_overhead}  \n{spec.guidance}" + (f"  \n*{spec.notes}*" if spec.notes else ""))


def memory_frame(result: dict[str, Any]) -> pd.DataFrame:
    rows = [{"estimate": "training", "term": name, "GiB": round(value / GIB, 4)}
            for name, value in result["memory_bytes"].items() if value > 0]
    return pd.DataFrame(rows)


def evaluate(source: str, method: str, names: list[str], values: list[Any], setup_values: list[Any]):
    """Everything the right-hand side shows, for the current inputs."""
    batch, seq, dtype, quant, ckpt, optimizer, gpu_gib = setup_values
    try:
        arch = arch_for(source)
        settings = param_widgets.read_settings(method, names, values)
        setup = TrainSetup(batch_size=int(batch or 1), seq_len=int(seq or 1), dtype=dtype, quant=quant,
                           grad_checkpointing=bool(ckpt), optimizer=optimizer)
        gpu = int(float(gpu_gib) * GIB) if gpu_gib else None
        result = plan(arch, method, settings, setup, gpu)
    except (SettingError, ModelSourceError, ValueError) as exc:
        message = f"**Cannot estimate:** {exc}"
        return message, "", pd.DataFrame(columns=["estimate", "term", "GiB"]), ""
    count = (f"## {result['trainable_params']:,} trainable parameters\n"
             f"{result['trainable_percent']:.4f} % of {result['total_params']:,}")
    formula = f"`{result['formula']}`"
    terms = "  \n".join(f"**{name}** {value / GIB:.3f} GiB: {result['memory_formulas'][name]}"
                        for name, value in result["memory_bytes"].items())
    total = (f"### Estimated training memory: {result['total_bytes'] / GIB:.2f} GiB — "
             f"{VERDICT_TEXT[result['verdict']]}\n{terms}")
    return count, formula, memory_frame(result), total


def build(demo: gr.Blocks) -> gr.Dropdown:
    methods = all_methods()
    # Warm the default model's ArchInfo in the background (a child process the first time).
    threading.Thread(target=lambda: _safe(arch_for, config.DEFAULT_MODEL), daemon=True).start()
    with gr.Row():
        with gr.Column(scale=2):
            with gr.Row(equal_height=True):
                source = gr.Textbox(value=config.DEFAULT_MODEL, label="Model", scale=3, elem_id="method-model",
                                    info="'default' (the embedded SmolLM2-135M), a model folder, config.json, "
                                         ".gguf file or hub id. Only its config is read.")
                load = gr.Button("Read model", scale=1, size="sm", elem_id="method-model-load")
            model_info = gr.Markdown(elem_id="method-model-info")
            method = gr.Dropdown(choices=[(m.title, m.name) for m in methods], value="lora", label="Method",
                                 elem_id="method-choice")
            card = gr.Markdown(method_card("lora"), elem_id="method-card")
            widgets = param_widgets.build()
            with gr.Accordion("Training setup", open=True, elem_id="method-setup"):
                with gr.Row():
                    batch = gr.Number(value=4, label="Batch size", minimum=1, precision=0, elem_id="setup-batch")
                    seq = gr.Number(value=256, label="Max length (tokens)", minimum=8, precision=0, elem_id="setup-seq")
                with gr.Row():
                    dtype = gr.Dropdown(["bf16", "fp16", "fp32"], value="bf16", label="Precision")
                    quant = gr.Dropdown(["none", "nf4", "int8"], value="none", label="Base quantisation",
                                        info="QLoRA always uses NF4")
                with gr.Row():
                    ckpt = gr.Checkbox(False, label="Gradient checkpointing", info="less memory, ~30 % slower")
                    optimizer = gr.Dropdown(["adamw", "adamw8bit", "sgd"], value="adamw", label="Optimizer")
                gpu_gib = gr.Number(value=_gpu_gib_default(), label="GPU memory available (GiB)",
                                    info="Read from your GPU when there is one; set it to plan for another.",
                                    elem_id="setup-gpu")
        with gr.Column(scale=3):
            count = gr.Markdown(elem_id="method-count")
            formula = gr.Markdown(elem_id="method-formula")
            bar = gr.BarPlot(x="estimate", y="GiB", color="term", label="Training memory by term",
                             elem_id="memory-bar", height=220)
            total = gr.Markdown(elem_id="memory-total")
            _advisor(source, batch, seq, dtype, gpu_gib)

    names = list(widgets)
    setup_inputs = [batch, seq, dtype, quant, ckpt, optimizer, gpu_gib]
    inputs = [source, method, *widgets.values(), *setup_inputs]

    def refresh(src, meth, *rest):
        values, setup_values = list(rest[:len(names)]), list(rest[len(names):])
        return evaluate(src, meth, names, values, setup_values)

    outputs = [count, formula, bar, total]

    def on_method(meth, request: gr.Request = None):
        # A cloned run's settings (see param_widgets.offer_settings) win over the defaults.
        values = param_widgets.take_settings(getattr(request, "session_hash", None), meth)
        return [method_card(meth), *param_widgets.show_method(get_method(meth), names, values)]

    method.change(on_method, [method], [card, *widgets.values()], api_name=False).then(
        refresh, inputs, outputs, api_name=False)
    for component in [*widgets.values(), *setup_inputs]:
        component.change(refresh, inputs, outputs, api_name=False, show_progress="hidden")
    load.click(lambda s: _safe(arch_summary, s), [source], [model_info], api_name=False).then(
        refresh, inputs, outputs, api_name=False)
    demo.load(on_method, [method], [card, *widgets.values()], api_name=False).then(
        refresh, inputs, outputs, api_name=False)
    demo.load(lambda s: _safe(arch_summary, s), [source], [model_info], api_name=False)
    return method


def _safe(fn, *args):
    try:
        return fn(*args)
    except (ModelSourceError, SettingError, ValueError, OSError) as exc:
        return f"**Cannot read that model:** {exc}"


def _advisor(source, batch, seq, dtype, gpu_gib) -> None:
    with gr.Accordion("Advisor: which method for me?", open=False, elem_id="advisor"):
        with gr.Row():
            examples = gr.Number(value=1000, label="Training examples", precision=0, minimum=1)
            must_merge = gr.Checkbox(False, label="Must merge into the base")
            many_tasks = gr.Checkbox(False, label="Many tasks on one base")
            quality = gr.Checkbox(False, label="Quality first")
        ask = gr.Button("Rank the methods", elem_id="advisor-run")
        table = gr.Dataframe(headers=["method", "score", "reasons", "trainable", "GiB", "verdict"],
                             interactive=False, elem_id="advisor-table", wrap=True)

    def run(src, n, merge, many, qual, b, s, dt, gpu):
        arch = arch_for(src)
        constraints = Constraints(gpu_bytes=int(float(gpu) * GIB) if gpu else None, examples=int(n or 1),
                                  must_merge=merge, many_tasks=many, quality_first=qual)
        rows = recommend(arch, constraints, TrainSetup(batch_size=int(b), seq_len=int(s), dtype=dt))
        return [[r.title, r.score, r.reasons, f"{r.trainable_params:,}", round(r.total_bytes / GIB, 2), r.verdict]
                for r in rows]

    ask.click(run, [source, examples, must_merge, many_tasks, quality, batch, seq, dtype, gpu_gib], [table],
              api_name="advisor")
