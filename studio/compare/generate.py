"""Generation plumbing for the Compare tab: settings, prompts, a per-row streamer, a stop switch.

Kept apart from ``studio.compare.engine`` (which owns the models) so each file does one job: this one turns
one ``generate`` call over a batch of conversations into per-row answers with token counts and
per-row finish times, streaming the partial tokens of every row while it runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from studio.compare.settings import GenerationSettings, Messages


class StopSwitch(StoppingCriteria):
    """Ends a ``generate`` at the next token once ``event`` is set (the Stop button)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool,
                          device=input_ids.device)


class RowStreamer(BaseStreamer):
    """Collects each row's new tokens as ``generate`` produces them and notes when each row ends.

    ``generate`` first puts the prompt ids (batch × prompt length), then one token per row per
    step; finished rows keep receiving padding, which we ignore after their end-of-sequence."""

    def __init__(self, rows: int, eos_ids: set[int], on_step: Callable[["RowStreamer"], None] | None):
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.finished_at: list[float | None] = [None] * rows
        self.eos_ids, self.on_step = eos_ids, on_step
        self.started = time.perf_counter()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        step = value.reshape(len(self.tokens), -1)  # (batch,) or (batch, k) when tokens arrive k at a time
        now = time.perf_counter()
        for row, ids in enumerate(step.tolist()):
            for token in ids:
                if self.finished_at[row] is not None:
                    break
                if token in self.eos_ids:
                    self.finished_at[row] = now
                else:
                    self.tokens[row].append(token)
        if self.on_step is not None:
            self.on_step(self)

    def end(self) -> None:
        now = time.perf_counter()
        self.finished_at = [t if t is not None else now for t in self.finished_at]


def eos_ids(tokenizer: Any, model: Any) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def render(tokenizer: Any, messages: Messages, system_prompt: str | None, max_prompt_tokens: int) -> str:
    """A conversation through the chat template, oldest turns dropped until it fits.

    The newest user message is always kept: a long history must not make the column silent."""
    turns = [m for m in messages if m["role"] != "system"]
    while True:
        chat = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + turns
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        if len(turns) <= 1 or len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= max_prompt_tokens:
            return text
        turns = turns[2:]  # one user/assistant pair


def generate_rows(
    model: Any, tokenizer: Any, prompts: list[str], settings: GenerationSettings, *,
    stop: threading.Event, on_step: Callable[[RowStreamer], None] | None = None, **model_kwargs: Any,
) -> tuple[list[list[int]], list[float], bool]:
    """One left-padded ``generate`` over ``prompts``: each row's new token ids (without EOS and
    padding), seconds until each row finished, and whether Stop ended it."""
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # every row's answer then starts at the same column
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    finally:
        tokenizer.padding_side = previous_side
    streamer = RowStreamer(len(prompts), eos_ids(tokenizer, model), on_step)
    if settings.sample:
        torch.manual_seed(settings.seed)
    with torch.no_grad():
        out = model.generate(**batch, **settings.generate_kwargs(), **model_kwargs,
                             max_new_tokens=settings.max_new_tokens, streamer=streamer,
                             stopping_criteria=StoppingCriteriaList([StopSwitch(stop)]),
                             pad_token_id=tokenizer.pad_token_id)
    new = out[:, batch["input_ids"].shape[1]:].tolist()
    ends = streamer.eos_ids
    rows = []
    for ids in new:
        cut = next((i for i, t in enumerate(ids) if t in ends), len(ids))
        rows.append(ids[:cut])
    seconds = [t - streamer.started for t in streamer.finished_at]
    return rows, seconds, stop.is_set()
