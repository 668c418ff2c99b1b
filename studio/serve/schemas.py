"""The OpenAI request and response shapes of the serving API, and the one error shape.

Requests are pydantic models: a wrong type or a missing field becomes a 400 naming the field
(``validation_message``), fields a client sends that we do not use are ignored (clients send
many), and the bounds OpenAI documents are enforced here (``temperature`` in [0, 2], ``top_p``
in (0, 1], at most 4 stop strings, ``n`` = 1). Responses are plain dicts in OpenAI's shapes:
``chat.completion``, ``chat.completion.chunk``, ``text_completion``, ``model`` lists. Nothing
here imports torch.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP = 4  # OpenAI's limit on stop strings
MAX_STOP_CHARS = 256  # one stop string; longer is a mistake, not a stop sequence
SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed's range (non-negative)
UNION_TAGS = frozenset({"str", "int", "float", "bool", "none"})  # see _is_type_name


class RequestError(Exception):
    """A request refused before it reaches the engine: ``status``, the field at fault (``param``)
    and OpenAI's ``code``; ``str(exc)`` is the message the client reads."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.type = status, param, code, type


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: what the official clients parse into ``APIStatusError``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# -- requests -------------------------------------------------------------------------------

class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use


class TextPart(_Lenient):
    type: str
    text: str | None = None


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self, where: str) -> str:
        """The content as one string; a list of parts is their texts joined by newlines (as vLLM
        does). Image or audio parts are refused: this server serves text models."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for index, part in enumerate(self.content):
            if part.type != "text" or part.text is None:
                raise RequestError(f"{where}.content.{index}: only text parts are served "
                                   f"(got a {part.type!r} part)", param=f"{where}.content")
            texts.append(part.text)
        return "\n".join(texts)


class StreamOptions(_Lenient):
    include_usage: bool = False


class _Generation(_Lenient):
    """The fields both completion endpoints share."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    n: int = 1
    ignore_eos: bool = False  # vLLM's extension (``extra_body`` in the openai client): see ``Sampling``
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stops)}")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"each stop string must hold 1 to {MAX_STOP_CHARS} characters")
        return tuple(stops)

    @field_validator("n")
    @classmethod
    def _n(cls, value):
        if value != 1:
            raise ValueError(f"only n=1 is served (one answer per request), got {value}")
        return value

    def asked_max_tokens(self) -> int | None:
        return self.max_tokens

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name of max_tokens

    def asked_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them (``developer`` is OpenAI's newer
        ``system``)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text(f"messages.{i}")}
                for i, m in enumerate(self.messages)]


class CompletionRequest(_Generation):
    prompt: str | list[str]

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise RequestError(f"prompt: one prompt per request (a string, or a list of one), got "
                               f"a list of {len(self.prompt)}", param="prompt")
        return self.prompt[0]


class AdapterRequest(_Lenient):
    name: str = Field(min_length=1, max_length=64)
    path: str = Field(min_length=1, max_length=4096)


def parse(model: type[BaseModel], raw: bytes) -> Any:
    """The request body as ``model``; ``RequestError`` (400) naming the field otherwise."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, param = validation_message(exc.errors())
        raise RequestError(message, param=param) from None


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """(a message naming the field and what is wrong, the field's dotted name) for pydantic's
    errors. A field with a union type (``stop``: a string or a list) reports one error per
    alternative; the first one said is enough."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    # pydantic names the union alternative tried ("str", "list[str]"): not part of the field.
    loc = [part for part in loc if not _is_type_name(part)]
    field = ".".join(loc) or None
    if first.get("type") == "missing":
        return f"{field}: this field is required", field
    message = first.get("msg", "invalid value")
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    got = first.get("input")
    shown = "" if first.get("type") == "value_error" or isinstance(got, (dict, list)) else f" (got {_short(got)})"
    return f"{field or 'request'}: {message}{shown}", field


def _is_type_name(part: str) -> bool:
    """A union alternative's tag in pydantic's error location (``str``, ``list[str]``,
    ``TextPart``, ``function-after[...]``), as opposed to a field name or a list index."""
    return part in UNION_TAGS or "[" in part or part[:1].isupper()


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- responses ------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(id: str, model: str, text: str, finish_reason: str | None,
                    prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"id": id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(id: str, model: str, created: int, delta: dict[str, Any] | None,
               finish_reason: str | None = None, usage_row: dict | None = None,
               with_usage: bool = False) -> dict[str, Any]:
    """One ``chat.completion.chunk``: a delta (the role first, then content pieces), the finish
    reason, or (``delta`` None) the final usage chunk, whose ``choices`` is empty."""
    chunk: dict[str, Any] = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                             "choices": [] if delta is None else
                             [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if with_usage:  # OpenAI sends "usage": null on every chunk but the last when usage is asked
        chunk["usage"] = usage_row
    return chunk


def text_completion(id: str, model: str, text: str, finish_reason: str | None,
                    prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"id": id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def text_chunk(id: str, model: str, created: int, text: str | None, finish_reason: str | None = None,
               usage_row: dict | None = None, with_usage: bool = False) -> dict[str, Any]:
    chunk: dict[str, Any] = {"id": id, "object": "text_completion", "created": created, "model": model,
                             "choices": [] if text is None else
                             [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}
    if with_usage:
        chunk["usage"] = usage_row
    return chunk


def model_card(entry: Any, created: int, base_name: str) -> dict[str, Any]:
    """One ``model`` object of ``GET /v1/models``; an adapter names its base in ``parent`` (as
    vLLM does), plus its method and whether it is in memory now."""
    return {"id": entry.name, "object": "model", "created": created, "owned_by": "peft-studio",
            "root": base_name, "parent": entry.parent, "method": entry.method, "loaded": entry.loaded}


def sse(data: Any) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()
