"""The HTTP side of ``peft-studio serve``: OpenAI's routes over a ``ServeEngine``.

``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /health``,
and, only when enabled, ``POST /v1/adapters`` / ``DELETE /v1/adapters/{name}``. Every refusal is
OpenAI's error object with the right status (``schemas.error_body``), and every failure inside
a handler is caught there: one bad request never stops the server.

Before any route, ``ServeGuard`` checks what ``studio.ui.guard`` checks for the app (the same
code: a ``Host`` that is not a name the server was started on is DNS rebinding, 421; a foreign
``Origin`` or a cross-site browser request, 403), then the API key (``Authorization: Bearer``,
compared in constant time) and the body size (1 MiB). The engine blocks (it waits for tokens),
so it is only ever called from worker threads, never on the event loop.
"""

from __future__ import annotations

import hmac
import logging
import time
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.middleware.body_limit import RequestBodyLimitMiddleware

from studio.serve import schemas, stream
from studio.serve.completion import ServeError
from studio.serve.schemas import RequestError, error_body

log = logging.getLogger("studio.serve")

MAX_BODY = 1 << 20  # 1 MiB: a long conversation is tens of KB; the context bounds the rest
DRAIN_LIMIT = 8 << 20  # an oversized body up to this is read before the 413 (see ServeGuard)
MAX_TOKENS_CAP = 4096  # the largest max_tokens a request may ask (never past the context)
DEFAULT_MAX_TOKENS = 256  # when a request does not say (the room left in the context if less)
DISCONNECT_POLL_S = 0.1  # how often a waiting non-streamed request checks its client is there
STREAM_THREADS = 256  # threads that may wait on a stream's next piece at once
PUBLIC_PATHS = frozenset({"/health"})  # answered without the key: says only "ok"


class ServeGuard:
    """ASGI layer before every route: Host/Origin (``studio.ui.guard.RequestGuard``'s checks),
    the API key, the body size. Refusals are OpenAI error objects."""

    def __init__(self, app, host: str, api_key: str | None, cors_origins: tuple[str, ...] = ()):
        from studio.ui.guard import RequestGuard

        self.app = app
        # Its checks only: no Gradio app (so no login), no upload route.
        self.checks = RequestGuard(app, None, host, None)
        self.key = api_key.encode() if api_key else None
        self.cors_origins = frozenset(o.rstrip("/") for o in cors_origins)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan; no websockets are served
            await self.app(scope, receive, send)
            return
        from studio.ui.guard import request_headers

        headers = request_headers(scope)
        origin = headers.get("origin", "").rstrip("/")
        if origin and origin in self.cors_origins:
            # A page the user allowed (--cors-origin): the Host is still checked, not its origin.
            headers = {k: v for k, v in headers.items() if k != "origin" and not k.startswith("sec-fetch")}
        refusal = self.checks.refusal(scope, headers)
        if refusal is not None:
            status, reason, _ = refusal
            await _json(status, error_body(reason, "forbidden", code="refused"))(scope, receive, send)
            return
        if self.key is not None and scope["path"] not in PUBLIC_PATHS and scope["method"] != "OPTIONS":
            given = headers.get("authorization", "")
            token = given[7:].strip() if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), self.key):
                message = ("missing API key: send it as 'Authorization: Bearer KEY'" if not token
                           else "wrong API key")
                await _json(401, error_body(message, "invalid_request_error", code="invalid_api_key"),
                            {"www-authenticate": "Bearer"})(scope, receive, send)
                return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY:
            # A body up to a few MiB is read and dropped first: answering before the client has
            # sent it makes the closing socket reset the connection, and the client would see a
            # network error instead of the 413. A larger one is answered at once, then closed.
            if int(declared) <= DRAIN_LIMIT:
                await _drain(receive)
            await _json(413, error_body(f"the request body is {int(declared)} bytes, over the "
                                        f"{MAX_BODY} byte limit", code="request_too_large"),
                        {"connection": "close"})(scope, receive, send)
            return
        # A body sent without a length (chunked) is counted as it arrives.
        await RequestBodyLimitMiddleware(self.app, MAX_BODY)(scope, receive, send)


async def _drain(receive) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


def _json(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def error_response(exc: BaseException) -> JSONResponse:
    """The OpenAI error for anything a handler raised; an unexpected error is logged with its
    traceback and answered 500, and the server goes on."""
    from studio.compare.sources import AdapterSourceError

    if isinstance(exc, RequestError):
        return _json(exc.status, error_body(str(exc), exc.type, exc.param, exc.code))
    if isinstance(exc, ServeError):
        return _json(exc.status, error_body(str(exc), exc.type, exc.param, exc.code))
    if isinstance(exc, HTTPException):  # a chunked body past the limit, met while reading it
        return _json(exc.status_code, error_body(_http_message(exc.status_code, str(exc.detail)),
                                                 code="request_too_large" if exc.status_code == 413 else None))
    if isinstance(exc, AdapterSourceError):
        return _json(400, error_body(str(exc), param="path", code="bad_adapter_folder"))
    log.error("serving failed", exc_info=exc)
    return _json(500, error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"))


def create_app(engine, catalog, *, api_key: str | None, host: str, port: int,
               allow_adapter_admin: bool = False, cors_origins: tuple[str, ...] = (),
               max_tokens_cap: int = MAX_TOKENS_CAP) -> FastAPI:
    """The API over ``engine``, serving ``catalog`` (its adapters registered here when the
    engine does not hold them yet). A host other than loopback without ``api_key`` is refused
    (``ValueError``): anyone who reaches the machine could use it. ``port`` is the one announced;
    the Host check compares with the port each request really arrived on (``--port 0``)."""
    from studio.ui.launch import is_loopback

    if not api_key and not is_loopback(host):
        raise ValueError(f"refusing to listen on {host} without an API key: anyone who can reach "
                         "this machine could use it. Add --api-key-file FILE, or leave out --host "
                         "to stay on 127.0.0.1.")
    held = {entry.name for entry in engine.models()}
    for name, folder in catalog.adapters.items():
        if name not in held:
            engine.register(name, Path(folder))
    app = FastAPI(title="PEFT Studio serve", docs_url=None, redoc_url=None, openapi_url=None)
    state = _State(engine, catalog, allow_adapter_admin, min(max_tokens_cap, engine.max_context))
    app.state.serve = state
    _routes(app, state)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["authorization", "content-type"])
    app.add_middleware(ServeGuard, host=host, api_key=api_key, cors_origins=tuple(cors_origins))
    return app


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = schemas.validation_message(list(exc.errors()))
    return _json(400, error_body(message, param=param))


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    message = _http_message(exc.status_code, str(exc.detail))
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path} (this server serves /v1/models, " \
                  "/v1/chat/completions, /v1/completions)"
    return _json(exc.status_code, error_body(message, "invalid_request_error"), getattr(exc, "headers", None))


def _http_message(status: int, detail: str) -> str:
    return f"the request body is over the {MAX_BODY} byte limit" if status == 413 else detail


class _State:
    def __init__(self, engine, catalog, admin: bool, cap: int):
        self.engine, self.catalog, self.admin, self.cap = engine, catalog, admin, cap
        self.created = int(time.time())
        self.limiter = anyio.CapacityLimiter(STREAM_THREADS)

    def base_name(self) -> str:
        return self.engine.models()[0].name


def _routes(app: FastAPI, state: _State) -> None:
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        try:
            entries = await anyio.to_thread.run_sync(state.engine.models)
            base = entries[0].name
            return {"object": "list", "data": [schemas.model_card(e, state.created, base) for e in entries]}
        except Exception as exc:
            return error_response(exc)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _complete(request, state, schemas.ChatRequest, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(request, state, schemas.CompletionRequest, chat=False)

    @app.post("/v1/adapters")
    async def load_adapter(request: Request):
        try:
            _admin_allowed(state)
            body = schemas.parse(schemas.AdapterRequest, await request.body())
            entry = await anyio.to_thread.run_sync(_register, state, body.name, body.path)
            return schemas.model_card(entry, state.created, state.base_name())
        except Exception as exc:
            return error_response(exc)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        try:
            _admin_allowed(state)
            if name == state.base_name():
                raise RequestError("the base model cannot be unloaded", param="name")
            if name not in {e.name for e in state.engine.models()}:
                raise RequestError(f"no adapter {name!r} is served", status=404, param="name",
                                   code="model_not_found")
            await anyio.to_thread.run_sync(state.engine.unregister, name)
            return {"id": name, "object": "model", "deleted": True}
        except Exception as exc:
            return error_response(exc)


def _admin_allowed(state: _State) -> None:
    if not state.admin:
        raise RequestError("loading and unloading adapters is off on this server: start it with "
                           "--allow-adapter-admin to enable POST /v1/adapters and DELETE "
                           "/v1/adapters/{name}", status=403, code="adapter_admin_disabled")


def _register(state: _State, name: str, path: str):
    """Register a folder a client named: only inside the catalog's allowed roots (links
    resolved) or one the command line named, and only a recognised safetensors adapter (the
    engine checks the folder)."""
    try:
        folder = Path(path).expanduser().resolve(strict=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise RequestError(f"path: {path!r} cannot be opened ({exc})", param="path") from None
    if not state.catalog.may_load(folder):
        roots = ", ".join(str(r) for r in state.catalog.allowed_roots) or "none: no project is served"
        raise RequestError(f"path: {folder} is outside the folders this server loads adapters from "
                           f"({roots}); name it with --adapter NAME=PATH when starting the server",
                           status=403, param="path", code="path_not_allowed")
    try:
        return state.engine.register(name, folder)
    except ValueError as exc:
        from studio.compare.sources import AdapterSourceError

        if isinstance(exc, AdapterSourceError):
            raise
        raise RequestError(f"name: {exc}", param="name") from None


# -- completions ----------------------------------------------------------------------------

async def _complete(request: Request, state: _State, model_type, chat: bool):
    try:
        body = schemas.parse(model_type, await request.body())
        completion = await anyio.to_thread.run_sync(_submit, state, body, chat)
    except Exception as exc:
        return error_response(exc)
    make = stream.ChatShapes if chat else stream.TextShapes
    if not body.stream:
        try:
            text = await _whole_text(request, completion, state.limiter)
        except Exception as exc:
            return error_response(exc)
        finally:
            if completion.finish_reason is None:
                completion.cancel()
        return make(completion, body.model).whole(text)
    pieces = completion.deltas()
    # The first piece is awaited before answering, so that a failure at the start (an adapter
    # that does not load) gets its own status rather than an error inside a 200 stream.
    try:
        first = await anyio.to_thread.run_sync(next, pieces, None, limiter=state.limiter)
    except Exception as exc:
        completion.cancel()
        return error_response(exc)
    return stream.CompletionStream(stream.events(completion, pieces, first, make(completion, body.model),
                                     body.include_usage(), state.limiter), completion)


async def _whole_text(request: Request, completion, limiter) -> str:
    """The whole answer, waited for in a worker thread. A client that goes away meanwhile (a
    timeout, Ctrl-C) cancels it, as a closed stream does: nobody would read the answer."""
    outcome: dict[str, Any] = {}

    async def watch():
        while completion.finish_reason is None:
            await anyio.sleep(DISCONNECT_POLL_S)
            if await request.is_disconnected():
                completion.cancel()
                return

    async with anyio.create_task_group() as group:
        group.start_soon(watch)
        try:
            outcome["text"] = await anyio.to_thread.run_sync(completion.text, limiter=limiter)
        except Exception as exc:  # kept out of the task group's ExceptionGroup
            outcome["error"] = exc
        group.cancel_scope.cancel()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["text"]


def _submit(state: _State, body, chat: bool):
    """Tokenize the request and hand it to the engine (in a worker thread: tokenizers and the
    engine's lock are blocking)."""
    from studio.serve.completion import Sampling

    engine = state.engine
    if chat:
        ids = _chat_ids(engine.tokenizer_for(body.model), body.chat())
    else:
        # Raw text through the base's tokenizer, its special tokens (a BOS) included as a
        # model expects at the start of a text.
        tokenizer = engine.tokenizer_for(state.base_name())
        engine.tokenizer_for(body.model)  # an unknown model is a 404 before anything else
        ids = tokenizer(body.prompt_text())["input_ids"]
    if not ids:
        raise RequestError("the prompt is empty", param="messages" if chat else "prompt")
    asked = body.asked_max_tokens()
    field = "max_completion_tokens" if chat and body.max_completion_tokens is not None else "max_tokens"
    if asked is not None and asked > state.cap:
        raise RequestError(f"{field} is {asked}; this server answers at most {state.cap} tokens "
                           f"(the model's context is {engine.max_context})", param=field,
                           code="max_tokens_too_large")
    if asked is None:  # the default, or the room the context leaves if that is less
        asked = max(1, min(DEFAULT_MAX_TOKENS, state.cap, engine.max_context - len(ids)))
    sampling = Sampling(max_tokens=asked, temperature=body.temperature, top_p=body.top_p,
                        seed=body.seed, stop=body.stop or (), ignore_eos=body.ignore_eos)
    return engine.submit(body.model, list(ids), sampling)


def _chat_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The conversation through the tokenizer's own chat template, with the assistant's header
    (``studio.evaluate.render_prompt``, as Compare and the evaluation build prompts), then
    tokenized without special tokens: the template already wrote them."""
    from studio.evaluate import render_prompt

    if not getattr(tokenizer, "chat_template", None):
        raise RequestError("this model's tokenizer has no chat template: use /v1/completions with "
                           "a plain prompt", param="messages", code="no_chat_template")
    try:
        text = render_prompt(tokenizer, messages)
    except Exception as exc:  # the template's own refusal (e.g. roles that must alternate)
        raise RequestError(f"messages: the chat template refused them ({exc})", param="messages") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]
