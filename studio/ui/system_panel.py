"""The system panel: device, GPU memory, RAM and disk, refreshed on demand."""

from __future__ import annotations

import threading

import gradio as gr

from studio import sysinfo
from studio.ui import labels


def build() -> tuple[gr.Markdown, callable]:
    # Start the GPU probe (a child process that imports torch) now, so it is ready by the time
    # the page asks; the UI process itself never imports torch for this.
    threading.Thread(target=sysinfo.probe_accelerators, daemon=True).start()
    with gr.Accordion(labels.SYSTEM, open=True, elem_id="system-panel"):
        summary = gr.Markdown(labels.SYSTEM_READING, elem_id="system-summary")
        refresh = gr.Button(labels.REFRESH, size="sm", elem_id="system-refresh")
    refresh.click(sysinfo.summary_markdown, None, [summary], api_name="system_summary")
    return summary, sysinfo.summary_markdown
