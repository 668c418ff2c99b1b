"""Hyperparameter widgets built from the methods' ``Params`` dataclasses.

One widget per distinct setting name across all methods (``r`` is shared by LoRA, LoHa, VeRA,
Houlsby, ...). Changing method shows that method's settings with its defaults, labels, help
texts and bounds, at the values the session's run draft holds (``studio.ui.draft``); each
widget's edits write that one setting into the draft.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gradio as gr

from studio.methods import all_methods
from studio.methods.base import MethodSpec
from studio.ui import labels


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def _display(value: Any) -> Any:
    return ", ".join(value) if isinstance(value, tuple) else value


def field_catalogue() -> dict[str, dataclasses.Field]:
    """Every setting name, with the first declaration seen (for its widget type)."""
    catalogue: dict[str, dataclasses.Field] = {}
    for spec in all_methods():
        for f in spec.fields():
            catalogue.setdefault(f.name, f)
    return catalogue


def _widget(f: dataclasses.Field) -> gr.components.Component:
    meta, default = f.metadata, _default(f)
    common = dict(label=f.name, info=meta["help"], visible=False, elem_id=f"param-{f.name}")
    if isinstance(default, bool):
        return gr.Checkbox(value=default, **common)
    if meta.get("choices"):
        return gr.Dropdown(choices=list(meta["choices"]), value=default, **common)
    if isinstance(default, (int, float)):
        return gr.Number(value=default, minimum=meta.get("min"), maximum=meta.get("max"),
                         step=meta.get("step") or (1 if isinstance(default, int) else 0.01),
                         precision=0 if isinstance(default, int) else None, **common)
    return gr.Textbox(value=_display(default), **common)


def build() -> dict[str, gr.components.Component]:
    """Render all widgets (hidden); advanced ones go in a folded accordion."""
    catalogue = field_catalogue()
    widgets: dict[str, gr.components.Component] = {}
    for name, f in catalogue.items():
        if not f.metadata.get("advanced"):
            widgets[name] = _widget(f)
    with gr.Accordion(labels.METHOD["advanced"], open=False, elem_id="method-advanced"):
        for name, f in catalogue.items():
            if f.metadata.get("advanced"):
                widgets[name] = _widget(f)
    return widgets


def show_method(spec: MethodSpec, names: list[str], values: dict[str, Any] | None = None) -> list[Any]:
    """Updates for the widgets ``names``: visible with ``spec``'s settings, at ``values`` where
    given (a cloned run's settings) and at the defaults otherwise."""
    own = {f.name: f for f in spec.fields()}
    values = values or {}
    updates = []
    for name in names:
        f = own.get(name)
        if f is None:
            updates.append(gr.update(visible=False))
            continue
        value = values[name] if name in values else _default(f)
        update: dict[str, Any] = dict(visible=True, value=_display(tuple(value) if isinstance(value, list) else value),
                                      info=f.metadata["help"])
        if f.metadata.get("min") is not None or f.metadata.get("max") is not None:
            update.update(minimum=f.metadata.get("min"), maximum=f.metadata.get("max"))
        updates.append(gr.update(**update))
    return updates
