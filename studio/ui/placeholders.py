"""Tabs that are not built yet: each says what it will do, so the app is honest about its state."""

from __future__ import annotations

import gradio as gr

from studio.ui import labels


def build(tab_name: str) -> None:
    gr.Markdown(f"{labels.NOT_BUILT}\n\n> {labels.COMING[tab_name]}", elem_id=f"coming-{tab_name.lower()}")

