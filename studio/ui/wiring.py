"""How a tab edits and redraws the session's run draft (``studio.ui.draft``, one ``gr.State``).

- ``edits``: a user's edit of a widget writes the draft, and only that. It listens to ``input``
  (user changes), never ``change`` (which a redraw fires too), so redrawing a tab can never write
  an older value back or reset what History's clone put there. All draft writes share one
  concurrency group: two quick edits in one session cannot both read the old draft and lose one.
- ``DraftView``: a tab's redraw from the draft, which app.py runs when the tab is opened and
  after a clone. Gradio 6 renders a tab's children only when it is first opened; drawing from the
  draft on opening makes what the tab shows independent of which events reached it before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from studio.ui.draft import RunDraft

DRAFT_QUEUE = "run-draft"


def edits(component: Any, edit: Callable[[RunDraft, Any], RunDraft], draft: gr.State,
          event: str = "input"):
    """Wire ``component``'s user ``event`` to ``draft = edit(draft, value)``; returns the event
    (chain the estimate on its ``.success``). A value the draft refuses is a message to the user
    and the draft is kept as it was."""
    def write(current: RunDraft, value: Any) -> RunDraft:
        try:
            return edit(current, value)
        except (ValueError, TypeError) as exc:
            raise gr.Error(str(exc)) from None

    return getattr(component, event)(write, [draft, component], [draft], api_name=False,
                                     show_progress="hidden", concurrency_id=DRAFT_QUEUE)


@dataclass
class DraftView:
    """A tab's redraw: ``fn(*inputs)`` returns the updates of ``outputs`` (the draft among them
    when the redraw has to correct it, e.g. a dataset no longer offered); ``then``: what runs
    after (the tab's estimate), as (fn, inputs, outputs)."""
    fn: Callable[..., Any]
    inputs: list[Any]
    outputs: list[Any]
    then: list[tuple[Callable[..., Any], list[Any], list[Any]]] = field(default_factory=list)

    def after(self, event: Any) -> Any:
        """Run the redraw (and what follows it) after ``event``; returns the last event."""
        event = event.then(self.fn, self.inputs, self.outputs, api_name=False, show_progress="hidden",
                           concurrency_id=DRAFT_QUEUE)
        for fn, inputs, outputs in self.then:
            event = event.then(fn, inputs, outputs, api_name=False, show_progress="hidden")
        return event

    def on(self, trigger: Callable[..., Any]) -> Any:
        """Run the redraw on ``trigger`` (e.g. ``tab.select``, ``demo.load``)."""
        event = trigger(self.fn, self.inputs, self.outputs, api_name=False, show_progress="hidden",
                        concurrency_id=DRAFT_QUEUE)
        for fn, inputs, outputs in self.then:
            event = event.then(fn, inputs, outputs, api_name=False, show_progress="hidden")
        return event
