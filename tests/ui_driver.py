"""One browser session of a built app, driven without a browser: the app's own event listeners
run in the order the page runs them, on the values the page would hold.

``Session(demo)`` keeps a value per component (its initial value; a ``gr.State`` deep-copied,
as Gradio does per session). ``fire(elem_id, event, value)`` is a user action: it sets the
widget's value and runs the listeners of that event, then their ``.then`` / ``.success`` chains.
An output that changes a component's value fires that component's ``change`` listeners, as the
page does. A handler raising ``gr.Error`` ends its ``.success`` chain (the page shows a toast).
Tests use it to check what the wiring between tabs does, with real handlers and a real database.
"""

from __future__ import annotations

import copy
from typing import Any

import gradio as gr

UNSET = object()


class Session:
    def __init__(self, demo: gr.Blocks) -> None:
        self.demo = demo
        self.values: dict[int, Any] = {bid: copy.deepcopy(getattr(b, "value", None))
                                       for bid, b in demo.blocks.items()}
        self.errors: list[str] = []
        self.selected_tab: str | None = None

    def block(self, elem_id: str) -> Any:
        found = [b for b in self.demo.blocks.values() if getattr(b, "elem_id", None) == elem_id]
        assert len(found) == 1, f"{len(found)} blocks with elem_id {elem_id!r}"
        return found[0]

    def value(self, elem_id: str) -> Any:
        return self.values[self.block(elem_id)._id]

    def state(self, kind: type) -> Any:
        """The value of the one ``gr.State`` holding a ``kind`` (e.g. the run draft)."""
        (found,) = [v for bid, v in self.values.items()
                    if isinstance(self.demo.blocks[bid], gr.State) and isinstance(v, kind)]
        return found

    def set(self, elem_id: str, value: Any) -> None:
        """A value the page holds, set without any event (e.g. a run already opened)."""
        self.values[self.block(elem_id)._id] = value

    def fire(self, target: str | Any, event: str, value: Any = UNSET) -> None:
        """The user's ``event`` on ``target`` (an elem_id or a block), with ``value`` typed first."""
        block = self.block(target) if isinstance(target, str) else target
        if value is not UNSET:
            self.values[block._id] = value
        for fn in self._listeners(block._id, event):
            self._run(fn)

    def load(self) -> None:
        """What the page runs when it opens: the ``demo.load`` listeners."""
        for fn in self._listeners(self.demo._id, "load"):
            self._run(fn)

    def _listeners(self, block_id: int, event: str) -> list[Any]:
        # ``gr.render`` functions build components: they need the page, and draw nothing tested here.
        return [f for f in self.demo.fns.values()
                if f.trigger_after is None and f.renderable is None
                and (block_id, event) in [tuple(t) for t in f.targets]]

    def _run(self, fn: Any) -> None:
        ok = True
        if fn.fn is not None:
            try:
                result = fn.fn(*[self.values.get(b._id) for b in fn.inputs])
            except gr.Error as exc:
                self.errors.append(str(exc))
                ok = False
            else:
                self._apply(fn.outputs, result)
        for after in self.demo.fns.values():
            if after.trigger_after == fn._id and (ok or not after.trigger_only_on_success):
                self._run(after)

    def _apply(self, outputs: list[Any], result: Any) -> None:
        if not outputs:
            return
        results = list(result) if len(outputs) > 1 else [result]
        changed = []
        for block, value in zip(outputs, results):
            if isinstance(block, gr.Tabs):
                if isinstance(value, gr.Tabs):
                    self.selected_tab = value.selected
                continue
            if isinstance(value, dict) and value.get("__type__") == "update":
                if "value" not in value:
                    continue
                value = value["value"]
            try:
                differs = bool(value != self.values.get(block._id))
            except (ValueError, TypeError):  # frames compare cell by cell: call them changed
                differs = True
            if differs:
                changed.append(block)
            self.values[block._id] = value
        for block in changed:
            if not isinstance(block, gr.State):
                self.fire(block, "change")
