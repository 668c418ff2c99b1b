"""``GenerateLane``: a lane's rows answered by ``generate`` in a thread of its own, for models whose
cache ``lanes.DecodeLane``'s loop cannot pad and concatenate (sliding window, hybrid).

It takes turns with the other lanes one decoding step at a time: the stopping criteria, which
``generate`` calls after every token, hand the turn back to the scheduler and wait for the next
one. Each row keeps its own sampler (forced on a greedy ``generate`` through a logits processor)
and its own end (``Completion._accept``: EOS unless ``ignore_eos``, stop strings, its budget).
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from studio.serve.lanes import Row, adapter_names, left_pad
from studio.serve.sampling import choose_rows


class _Sampler(LogitsProcessor):
    """Each row's own choice (``sampling.choose_rows``), forced on a greedy ``generate``: every
    score but the chosen token's becomes -inf, so argmax picks exactly what the row sampled."""

    def __init__(self, rows: list[Row]):
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        tokens = choose_rows(scores, self.rows)
        forced = torch.full_like(scores, float("-inf"))
        forced[torch.arange(len(tokens)), torch.tensor(tokens)] = 0.0
        return forced


class _RowEnds(StoppingCriteria):
    """Hands each new token to its row's completion and ends rows that are done (EOS, a stop
    string, their token budget, cancelled). ``after_step`` runs once per step: the turn hand-off."""

    def __init__(self, rows: list[Row], after_step):
        self.rows, self.after_step = rows, after_step

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        last = input_ids[:, -1].tolist()
        for row, token in zip(self.rows, last):
            if not row.done:
                row.done = row.completion._accept(token)
        self._cancels()
        if self.after_step is not None and not all(row.done for row in self.rows):
            self.after_step()  # wait for the next turn; a cancel may arrive meanwhile
            self._cancels()
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)

    def _cancels(self) -> None:
        for row in self.rows:
            if not row.done and row.completion._cancel_requested():
                row.completion._finish("cancelled")
                row.done = True


def generate_batch(model: Any, rows: list[Row], pad_id: int, after_step=None, mixed: bool = False) -> None:
    """Answer ``rows`` with one left-padded ``generate`` (each row its own sampler and budget).

    ``generate`` is given no end-of-sequence ids: each row's completion decides its own end
    (``Completion._accept``: EOS, unless the request asked ``ignore_eos``), and ``_RowEnds``
    tells ``generate`` which rows are done."""
    ids, mask = left_pad([r.prompt_ids for r in rows], pad_id)
    device = getattr(model, "device", torch.device("cpu"))
    budget = max(r.sampling.max_tokens for r in rows)
    extra = adapter_names(model, rows) if mixed else {}
    with torch.no_grad():
        model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=budget,
                       do_sample=False, logits_processor=LogitsProcessorList([_Sampler(rows)]),
                       stopping_criteria=StoppingCriteriaList([_RowEnds(rows, after_step)]),
                       pad_token_id=pad_id, eos_token_id=[], **extra)
    for row in rows:  # generate stopped: every row is done, whatever the reason
        if not row.done:
            row.completion._finish("length")
            row.done = True


class GenerateLane:
    """``generate`` for a lane's rows (the fallback for caches our loop cannot pad), in its own
    thread, one step per turn.

    ``step()`` (scheduler thread) gives the lane's thread the turn and waits until it hands the
    turn back after one decoding step (or after its ``generate`` ends). Rows arriving while a
    ``generate`` runs wait for the next one: ``generate`` cannot take rows mid-flight."""

    def __init__(self, model_for, pad_id: int, max_batch: int, on_error,
                 mixed: bool = False):
        self.model_for = model_for  # () -> the model now
        self.pad_id, self.max_batch, self.mixed = pad_id, max_batch, mixed
        self.on_error = on_error  # (rows, exception): the engine fails those rows
        self.pending: list[Row] = []
        self.running: list[Row] = []
        self._turn = threading.Semaphore(0)  # the lane's thread may run one step
        self._back = threading.Semaphore(0)  # the scheduler may go on
        self.view: Any = None  # the adapter view it serves (a re-attached adapter gets a new lane)
        self._thread: threading.Thread | None = None
        self._finished = False

    def add(self, row: Row) -> None:
        self.pending.append(row)

    def has_work(self) -> bool:
        return bool(self.pending or self.running)

    def step(self) -> list[Row]:
        """One decoding step; the rows that ended in it (or since the last step)."""
        if self._thread is None:
            if not self.pending:
                return []
            batch, self.pending = self.pending[:self.max_batch], self.pending[self.max_batch:]
            self.running = batch
            self._thread = threading.Thread(target=self._run, args=(batch,), daemon=True,
                                            name="serve-generate-lane")
            self._thread.start()
        self._turn.release()
        self._back.acquire()
        ended = [r for r in self.running if r.done]
        self.running = [r for r in self.running if not r.done]
        if self._finished:  # its generate returned: the next step starts a new one
            self._thread.join()
            self._thread, self._finished = None, False
        return ended

    def _run(self, batch: list[Row]) -> None:
        self._turn.acquire()
        try:
            generate_batch(self.model_for(), batch, self.pad_id, after_step=self._yield_turn,
                           mixed=self.mixed)
        except BaseException as exc:  # the rows fail with it; the lane (and the engine) go on
            self.on_error([r for r in batch if not r.done], exc)
            for r in batch:
                r.done = True
        finally:
            self._finished = True
            self._back.release()

    def _yield_turn(self) -> None:
        self._back.release()
        self._turn.acquire()
