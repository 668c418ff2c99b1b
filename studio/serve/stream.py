"""The answer of one completion in OpenAI's shapes: whole (``chat.completion``,
``text_completion``) or as server-sent events (the role first, each piece as it decodes, the
finish reason, the usage when asked, ``data: [DONE]``), and the streaming response that cancels
its completion when the client goes away. Split from ``api.py``, which routes and validates.
"""

from __future__ import annotations

import time

import anyio
from starlette.responses import StreamingResponse

from studio.serve import schemas


class _Shapes:
    def __init__(self, completion, model: str, prefix: str):
        self.completion, self.model = completion, model
        self.id = f"{prefix}-{completion.id.removeprefix('cmpl-')}"
        self.created = int(time.time())

    def usage(self) -> dict:
        return schemas.usage(self.completion.prompt_tokens, self.completion.completion_tokens)


class ChatShapes(_Shapes):
    def __init__(self, completion, model):
        super().__init__(completion, model, "chatcmpl")

    def whole(self, text: str) -> dict:
        c = self.completion
        return schemas.chat_completion(self.id, self.model, text, c.finish_reason, c.prompt_tokens,
                                       c.completion_tokens)

    def start(self, with_usage: bool) -> dict | None:  # the role comes first, alone
        return schemas.chat_chunk(self.id, self.model, self.created, {"role": "assistant", "content": ""},
                                  with_usage=with_usage)

    def piece(self, text: str, with_usage: bool) -> dict:
        return schemas.chat_chunk(self.id, self.model, self.created, {"content": text}, with_usage=with_usage)

    def end(self, with_usage: bool) -> dict:
        return schemas.chat_chunk(self.id, self.model, self.created, {}, self.completion.finish_reason,
                                  with_usage=with_usage)

    def usage_chunk(self) -> dict:
        return schemas.chat_chunk(self.id, self.model, self.created, None, usage_row=self.usage(),
                                  with_usage=True)


class TextShapes(_Shapes):
    def __init__(self, completion, model):
        super().__init__(completion, model, "cmpl")

    def whole(self, text: str) -> dict:
        c = self.completion
        return schemas.text_completion(self.id, self.model, text, c.finish_reason, c.prompt_tokens,
                                       c.completion_tokens)

    def start(self, with_usage: bool) -> dict | None:
        return None  # a text completion has no role

    def piece(self, text: str, with_usage: bool) -> dict:
        return schemas.text_chunk(self.id, self.model, self.created, text, with_usage=with_usage)

    def end(self, with_usage: bool) -> dict:
        return schemas.text_chunk(self.id, self.model, self.created, "", self.completion.finish_reason,
                                  with_usage=with_usage)

    def usage_chunk(self) -> dict:
        return schemas.text_chunk(self.id, self.model, self.created, None, usage_row=self.usage(),
                                  with_usage=True)


async def events(completion, pieces, first, shapes: _Shapes, with_usage: bool, limiter):
    """The server-sent events of one stream: the role, each piece as it decodes, the finish
    reason, the usage when asked, ``[DONE]``. An error after the first piece (the response has
    started) is sent as an error event, as OpenAI does."""
    start = shapes.start(with_usage)
    if start is not None:
        yield schemas.sse(start)
    piece = first
    try:
        while piece is not None:
            if piece:
                yield schemas.sse(shapes.piece(piece, with_usage))
            piece = await anyio.to_thread.run_sync(next, pieces, None, limiter=limiter)
    except Exception as exc:
        from studio.serve.api import error_response

        response = error_response(exc)
        yield b"data: " + response.body + b"\n\n"
        return
    yield schemas.sse(shapes.end(with_usage))
    if with_usage:
        yield schemas.sse(shapes.usage_chunk())
    yield schemas.sse("[DONE]")


class CompletionStream(StreamingResponse):
    """A stream that cancels its completion however it ends, a client that went away included
    (Starlette cancels the stream when the client disconnects): its slot is freed at the
    engine's next step."""

    media_type = "text/event-stream"

    def __init__(self, content, completion):
        super().__init__(content, headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.completion = completion

    async def listen_for_disconnect(self, receive):
        await super().listen_for_disconnect(receive)
        # At once, not when the next piece arrives: the thread waiting for it is released too.
        self._cancel()

    def _cancel(self):
        if self.completion.finish_reason is None:
            self.completion.cancel()

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cancel()
