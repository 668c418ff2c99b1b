"""Tabs that are not built yet: each says what it will do, so the app is honest about its state."""

from __future__ import annotations

import gradio as gr

from studio.ui import labels


def build(tab_name: str) -> None:
    gr.Markdown(f"{labels.NOT_BUILT}\n\n> {labels.COMING[tab_name]}", elem_id=f"coming-{tab_name.lower()}")


def sample_tasks_markdown() -> str:
    """The sample tasks shipped in assets/, so a newcomer sees data is ready to use."""
    try:
        from studio.samples import SAMPLE_TASKS, load_rows
    except ImportError:
        return ""
    lines = ["**Sample tasks ready to train on** (shipped in `assets/samples/`):", ""]
    for task in SAMPLE_TASKS.values():
        train, held_out = len(load_rows(task, "train")), len(load_rows(task, "eval"))
        lines.append(f"- **{task.title}** (`{task.name}`): {task.description} "
                     f"{train} training / {held_out} held-out examples.")
    return "\n".join(lines)
