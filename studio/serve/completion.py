"""What a request is, from outside the scheduler: the errors a client sees, the sampling settings,
a served model's entry, and ``Completion``, the thread-safe handle of one request (its text
pieces as they decode, its token ids, why it ended). ``studio.serve.engine`` re-exports them.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # no torch at import: the HTTP side imports the error classes' module cheaply
    from studio.serve.sampling import TextStream


# ---- errors a client sees (str(exc) is the message) ----------------------------------------
class ServeError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None
    param: str | None = None


class InvalidRequest(ServeError):
    """A request the engine cannot answer as given (empty prompt, a token id outside the
    vocabulary, sampling values out of range); ``param`` names the field."""
    status, type = 400, "invalid_request_error"

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class UnknownModel(ServeError):
    status, type, code, param = 404, "invalid_request_error", "model_not_found", "model"


class PromptTooLong(ServeError):
    status, type, code = 400, "invalid_request_error", "context_length_exceeded"


class Busy(ServeError):
    status, type, code = 429, "server_busy", "server_busy"


class AdapterInUse(ServeError):
    status, type, code = 409, "invalid_request_error", "adapter_in_use"


class AdapterLoadFailed(ServeError):
    status, type, code = 500, "server_error", "adapter_load_failed"


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_p: float = 1.0
    seed: int | None = None  # a seed makes a sampled answer reproducible whatever else is running
    stop: tuple[str, ...] = ()  # the answer ends before the first stop string; it is never emitted
    # vLLM's extension of the OpenAI fields: the end-of-sequence token is taken as any other and
    # the answer runs to max_tokens (or a stop string). For benchmarks that compare servers on
    # answers of equal length, as vLLM's own serving benchmark does.
    ignore_eos: bool = False


@dataclass(frozen=True)
class ModelEntry:
    name: str
    parent: str | None  # None for the base; the base's name for an adapter
    method: str | None
    folder: Path | None
    loaded: bool
    mixable: bool  # joins the mixed LoRA batch


class Completion:
    """The handle of one request. The scheduler thread writes, any thread reads."""

    def __init__(self, prompt_tokens: int, stream: TextStream, max_tokens: int, eos_ids: set[int]):
        self.id = f"cmpl-{uuid.uuid4().hex[:24]}"
        self.prompt_tokens = prompt_tokens
        self.finish_reason: str | None = None
        self.token_ids: list[int] = []
        self.error: ServeError | None = None
        self.token_times: list[float] = []  # when each token arrived (monotonic): tests, stats
        self._stream, self._max_tokens, self._eos = stream, max_tokens, eos_ids
        self._pieces: list[str] = []
        self._cond = threading.Condition()
        self._cancel = threading.Event()

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    # ---- reading (any thread) ----
    def deltas(self, timeout: float | None = None) -> Iterator[str]:
        """Text pieces as they decode; raises the ServeError that ended the request."""
        seen = 0
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cond:
                while seen >= len(self._pieces) and self.finish_reason is None and self.error is None:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutError(f"{self.id}: no answer within {timeout} s")
                    self._cond.wait(left)
                pieces, seen = self._pieces[seen:], len(self._pieces)
                ended, error = self.finish_reason is not None or self.error is not None, self.error
            yield from (p for p in pieces if p)
            if ended and seen >= len(self._pieces):
                if error is not None:
                    raise error
                return

    def text(self, timeout: float | None = None) -> str:
        return "".join(self.deltas(timeout))

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    # ---- writing (the scheduler) ----
    def _cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def _accept(self, token: int) -> bool:
        """One generated token; True when the row is done (EOS, a stop string, the budget)."""
        if self.done:
            return True
        if token in self._eos:
            self._finish("stop")
            return True
        self.token_ids.append(token)
        self.token_times.append(time.monotonic())
        piece, stopped = self._stream.add(token)
        self._put(piece)
        if stopped:
            self._finish("stop", flush=False)
            return True
        if len(self.token_ids) >= self._max_tokens:
            self._finish("length")
            return True
        return False

    def _put(self, piece: str) -> None:
        if piece:
            with self._cond:
                self._pieces.append(piece)
                self._cond.notify_all()

    def _finish(self, reason: str, flush: bool = True) -> None:
        if self.done:
            return
        if flush and reason != "cancelled":
            piece, stopped = self._stream.flush()
            self._put(piece)
            reason = "stop" if stopped else reason
        with self._cond:
            self.finish_reason = reason
            self._cond.notify_all()

    def _fail(self, error: ServeError) -> None:
        with self._cond:
            if not self.done:
                self.error = error
            self._cond.notify_all()
