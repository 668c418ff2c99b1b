"""Choosing each row's next token, and turning a row's tokens into streamed text with stop strings.

Every row samples on its own: its own temperature, top-p and ``torch.Generator``, so a seeded
request draws the same tokens whether it runs alone or beside fifteen others (the batch only
changes which rows are computed together, never the random numbers a row consumes).

Next token for one row, from its logits z (one value per vocabulary entry):

- temperature T = 0: greedy, argmax_i z_i (what ``generate(do_sample=False)`` picks; ties go to
  the lowest id in both).
- otherwise p = softmax(z / T), i.e. p_i = exp(z_i / T) / sum_j exp(z_j / T); then top-p
  (nucleus): sort p descending, p_(1) >= p_(2) >= ..., with cumulative sums c_k = p_(1) + ... +
  p_(k) (c_0 = 0); keep the smallest prefix whose cumulative probability reaches p, i.e. keep
  the k-th token exactly when c_(k-1) < top_p (so the top token is always kept); renormalise the
  kept ones, q_(k) = p_(k) / c_K; draw one index from q with the row's generator.
"""

from __future__ import annotations

from typing import Any

import torch


def new_generator(seed: int | None) -> torch.Generator:
    """The row's own random stream: seeded when the request gave a seed, else from the OS."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    return generator


def top_p_probabilities(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """q (see the module docstring) for one row of logits: a distribution over the vocabulary."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, descending=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # c_(k-1)
    keep = before < top_p
    keep[0] = True  # the top token, even when top_p is 0
    kept = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
    q = torch.zeros_like(probs)
    q[order] = kept / kept.sum()
    return q


def choose(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """The next token of one row (logits: a 1-D tensor over the vocabulary)."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    q = top_p_probabilities(logits, temperature, top_p)
    return int(torch.multinomial(q, 1, generator=generator))


def choose_rows(logits: torch.Tensor, rows: list[Any]) -> list[int]:
    """The next token of each row of a batch; ``rows[i]`` has ``sampling`` and ``generator``.

    Greedy rows share one argmax; sampled rows each draw from their own generator."""
    greedy = torch.argmax(logits, dim=-1).tolist()
    return [greedy[i] if row.sampling.temperature <= 0 else
            choose(logits[i], row.sampling.temperature, row.sampling.top_p, row.generator)
            for i, row in enumerate(rows)]


class TextStream:
    """A row's answer as text pieces, decoded as tokens arrive.

    Incremental decoding (as vLLM and text-generation-inference do it): decode a short window of
    ids before and after the newest token, and emit only what the newest tokens added. A
    byte-level tokenizer splits a multi-byte character over tokens; until its last byte arrives
    the window decodes to a trailing U+FFFD, which we hold back rather than emit.

    Stop strings: the answer ends before the first occurrence of any of them, and no piece of a
    stop string is ever emitted: text that could still be the beginning of a stop string is held
    back until it either completes one (the answer ends there) or cannot any more."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far
        self.emitted = 0  # how much of ``text`` has been handed out
        self._prefix = 0  # the window: ids[_prefix:_read] decode to text already counted
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> tuple[str, bool]:
        """The newly safe text after ``token``, and whether a stop string ended the answer."""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix:self._read])
        now = self._decode(self.ids[self._prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release()

    def _release(self) -> tuple[str, bool]:
        # A stop string cannot start before ``emitted``: anything that could begin one was held back.
        hits = [i for i in (self.text.find(stop, self.emitted) for stop in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            piece = self.text[self.emitted:end]
            self.emitted = end
            return piece, True
        safe = len(self.text) - self._held()
        piece = self.text[self.emitted:safe]
        self.emitted = max(self.emitted, safe)
        return piece, False

    def _held(self) -> int:
        """Length of the longest end of ``text`` that is the beginning of a stop string."""
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def flush(self) -> tuple[str, bool]:
        """At the end (EOS or the token budget): whatever was held back, now final, and whether
        a stop string completed in it."""
        rest = self._decode(self.ids[self._prefix:])[len(self._decode(self.ids[self._prefix:self._read])):]
        self.text += rest
        self._prefix = self._read = len(self.ids)
        piece, stopped = self._release()
        if stopped:
            return piece, True
        piece += self.text[self.emitted:]
        self.emitted = len(self.text)
        return piece, False
