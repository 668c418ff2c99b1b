"""The request guard: one ASGI layer in front of every route Gradio serves.

Binding to 127.0.0.1 keeps other machines out, not other web pages: a page the user visits can
point its own name at 127.0.0.1 (DNS rebinding) and then drive the app as if it were its own
site, or post to it cross-origin. Gradio 6.31 trusts the ``Host`` header: for a Host that is not
a loopback name it echoes any ``Origin`` in ``Access-Control-Allow-Origin`` and runs every
handler. So before Gradio (its CORS layer included) sees anything, this layer refuses:

- a ``Host`` that is not a name the app was started on, or not its port (421);
- an ``Origin`` other than the page's own, i.e. the same name and port as the ``Host``, so
  ``null`` and another local server's pages too (403);
- a browser request the browser itself marks as coming from another site (``Sec-Fetch-Site``),
  other than following a link to the page: this covers the requests that carry no ``Origin``;
- Gradio's run history (it can use the host's Hugging Face token): 404, always;
- with a login: every route but the login page's own without a Gradio session (401), login
  attempts past the ``LoginThrottle`` (429), and bodies over the size caps (413).

Each refusal is a short plain-text reason. Responses also forbid framing by other sites.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from urllib.parse import urlsplit

from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.responses import PlainTextResponse

from studio.ui import login_gate

ALLOWED_HOSTS_ENV = "PEFT_STUDIO_ALLOWED_HOSTS"  # extra name[:port]s, comma-separated
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
RUN_HISTORY_PREFIXES = ("/gradio_api/run-history", "/gradio_api/runs")
UPLOAD_PATHS = frozenset({"/gradio_api/upload", "/gradio_api/upload/"})
MULTIPART_SLACK = 1 << 20  # the form's boundaries and headers around the file itself
MAX_BODY = 64 << 20  # any other request: JSON of component values, far below this
MAX_PUBLIC_BODY = 64 << 10  # a login form, before anyone is known
FRAME_HEADERS = [(b"content-security-policy", b"frame-ancestors 'self'"),
                 (b"x-frame-options", b"SAMEORIGIN")]


def normalize_name(name: str) -> str:
    """A host name as compared: lower case, no IPv6 brackets, no trailing root dot."""
    name = name.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    return name.rstrip(".") if name not in WILDCARD_HOSTS else name


def _interface_addresses() -> set[str]:
    import psutil

    addresses = set()
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                addresses.add(normalize_name(entry.address.split("%")[0]))  # fe80::1%eth0
    return addresses


def allowed_names(bind_host: str) -> frozenset[str]:
    """The names a browser may put in ``Host`` for an app listening on ``bind_host``: the
    loopback names always, the host it was started on, and for a wildcard (0.0.0.0, ::) this
    machine's addresses and names."""
    names = set(LOOPBACK_NAMES)
    host = normalize_name(bind_host)
    if host in WILDCARD_HOSTS:
        names |= _interface_addresses()
        names |= {normalize_name(socket.gethostname()), normalize_name(socket.getfqdn())}
    else:
        names.add(host)
    names.discard("")
    return frozenset(names)


def extra_authorities(text: str) -> frozenset[tuple[str, int | None]]:
    """``PEFT_STUDIO_ALLOWED_HOSTS``: names, comma-separated; ``name:port`` allows that port
    too (an SSH tunnel or a forwarded port that differs from the one the app listens on)."""
    out = set()
    for item in text.split(","):
        authority = split_authority(item.strip(), None)
        if authority is not None:
            out.add(authority)
    return frozenset(out)


def split_authority(value: str, default_port: int | None) -> tuple[str, int | None] | None:
    """(name, port) of a ``Host`` value such as ``localhost:7860`` or ``[::1]:7860``; None
    when it is not a plain host[:port]."""
    if not value or any(ch in value for ch in "/?#@\\ \t"):
        return None
    try:
        parts = urlsplit("//" + value)
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return normalize_name(parts.hostname), default_port if port is None else port


def _origin_authority(origin: str) -> tuple[str, int] | None:
    """(name, port) of an ``Origin`` header; None for "null" or anything but http(s)."""
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        return None
    default = 443 if parts.scheme == "https" else 80
    return normalize_name(parts.hostname), default if port is None else port


def is_loopback_literal(name: str) -> bool:
    """An IP literal on this machine's loopback (127.0.0.0/8, ::1, ::ffff:127.x). A page can
    only make a browser send such a Host by loading that very address, which is then not the
    page's own origin: the Origin check sees it."""
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return False
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None
                              and ip.ipv4_mapped.is_loopback)


class RequestGuard:
    """The ASGI middleware. ``app`` is what it guards (Gradio's whole middleware stack);
    ``gradio_app`` is Gradio's ``App``, read at request time for its login state."""

    def __init__(self, app, gradio_app, bind_host: str, max_upload: int | None,
                 throttle: login_gate.LoginThrottle | None = None):
        self.app, self.gradio_app = app, gradio_app
        self.names = allowed_names(bind_host)
        self.extra = extra_authorities(os.environ.get(ALLOWED_HOSTS_ENV, ""))
        self.max_upload = max_upload
        self.throttle = throttle or login_gate.LoginThrottle()

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):  # lifespan
            await self.app(scope, receive, send)
            return
        headers = request_headers(scope)
        if scope["type"] == "http":
            send = _framing_forbidden(send)
        refusal = self.refusal(scope, headers)
        if refusal is not None:
            await _refuse(scope, receive, send, *refusal)
            return
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return
        await self._http(scope, receive, send, headers)

    # -- the checks every request passes, login or not ------------------------------------

    def _port(self, scope) -> int | None:
        server = scope.get("server")
        return server[1] if server else None  # None on a Unix socket: no port to compare

    def _host_allowed(self, name: str, port: int | None, server_port: int | None) -> bool:
        if (name, port) in self.extra:
            return True
        if server_port is not None and port != server_port:
            return False
        return name in self.names or is_loopback_literal(name) or (name, None) in self.extra

    def refusal(self, scope, headers) -> tuple[int, str, dict] | None:
        server_port = self._port(scope)
        host = headers.get("host", "")
        authority = split_authority(host, 443 if scope.get("scheme") in ("https", "wss") else 80)
        if authority is None or not self._host_allowed(*authority, server_port):
            return 421, (f"Refused: this studio answers to {self._describe(server_port)}, not "
                         f"to the Host {host[:100]!r} (a page under another name may be trying "
                         f"to drive it: DNS rebinding). To reach it under another name or port, "
                         f"list name[:port] in {ALLOWED_HOSTS_ENV}."), {}
        origin = headers.get("origin")
        if origin is not None and _origin_authority(origin) != authority:
            # Same origin only: the page must come from the very name and port it calls. This
            # also refuses another local server's pages (another port) and "null" origins.
            return 403, (f"Refused: a cross-origin request from {origin[:100]!r}. Only this "
                         f"studio's own pages may call it."), {}
        site = headers.get("sec-fetch-site")
        if site in ("cross-site", "same-site") and not (
                headers.get("sec-fetch-mode") == "navigate"
                and headers.get("sec-fetch-dest", "document") == "document"):
            return 403, "Refused: a request another site's page made to this studio.", {}
        path = scope.get("path", "")
        if path.startswith(RUN_HISTORY_PREFIXES):
            return 404, "Not found: run history is turned off in PEFT Studio.", {}
        if getattr(self.gradio_app, "auth", None) is not None and not login_gate.is_public(path):
            if login_gate.session_user(self.gradio_app, headers) is None:
                return 401, "Log in first: this studio requires a login.", {}
        return None

    def _describe(self, port: int | None) -> str:
        names = sorted(f"[{name}]" if ":" in name else name for name in self.names)
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        return f"{shown} on port {port}" if port is not None else shown

    # -- HTTP: the login throttle and the body caps ----------------------------------------

    async def _http(self, scope, receive, send, headers):
        path = scope.get("path", "")
        logins = getattr(self.gradio_app, "auth", None) is not None
        if logins and scope["method"] == "POST" and path in login_gate.LOGIN_PATHS:
            await self._login(scope, receive, send)
            return
        limit = MAX_BODY
        if path in UPLOAD_PATHS and self.max_upload is not None:
            limit = self.max_upload + MULTIPART_SLACK
        elif logins and login_gate.is_public(path):
            limit = MAX_PUBLIC_BODY
        declared = _content_length(headers)
        if declared is not None and declared > limit:
            if path in UPLOAD_PATHS:
                reason = (f"Refused: this upload is {_size(declared)}, over the "
                          f"{_size(self.max_upload)} limit. Import a larger dataset by its path "
                          "on the Data tab.")
            else:
                reason = (f"Refused: this request is {_size(declared)}, over the "
                          f"{_size(limit)} limit.")
            await _refuse(scope, receive, send, 413, reason, {"connection": "close"})
            return
        # A body sent without a length (chunked) is counted as it arrives: starlette's limiter.
        await RequestBodyLimitMiddleware(self.app, limit)(scope, receive, send)

    async def _login(self, scope, receive, send):
        client = scope.get("client")
        key = login_gate.client_key(client[0] if client else None)
        wait = self.throttle.attempt(key)
        if wait > 0:
            await _refuse(scope, receive, send, 429,
                          f"Too many failed logins from this address: try again in "
                          f"{login_gate.retry_after(wait)} s.",
                          {"retry-after": login_gate.retry_after(wait)})
            return
        status = {}

        async def watch(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        await RequestBodyLimitMiddleware(self.app, MAX_PUBLIC_BODY)(scope, receive, watch)
        if status.get("code") == 200:  # Gradio answers a wrong password with 400
            self.throttle.succeeded(key)


def request_headers(scope) -> dict[str, str]:
    """The request headers, names lower-cased; of a repeated header, the first."""
    out: dict[str, str] = {}
    for name, value in scope.get("headers", []):
        out.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return out


def _content_length(headers) -> int | None:
    try:
        return int(headers["content-length"])
    except (KeyError, ValueError):
        return None


def _size(count: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def _framing_forbidden(send):
    async def wrapped(message):
        if message["type"] == "http.response.start":
            message = dict(message)
            message["headers"] = [*message.get("headers", []), *FRAME_HEADERS]
        await send(message)
    return wrapped


async def _refuse(scope, receive, send, status: int, reason: str, headers: dict) -> None:
    if scope["type"] == "websocket":
        # Closing before accepting makes the server answer the handshake with 403.
        await send({"type": "websocket.close", "code": 1008, "reason": reason[:120]})
        return
    response = PlainTextResponse(reason + "\n", status_code=status, headers=headers)
    await response(scope, receive, send)


def guarded_app_class():
    """Gradio's ``App`` with this guard outside its whole middleware stack (Gradio's CORS layer
    included), for ``Blocks.launch(_app=...)``: the way Gradio's own ``gr.Server`` hands launch
    a prepared app. Built on demand so that importing this module does not import Gradio."""
    from gradio.routes import App

    class GuardedApp(App):
        def __init__(self, bind_host: str, max_upload: int | None, **kwargs):
            super().__init__(**kwargs)
            self.guard_settings = (bind_host, max_upload)

        def build_middleware_stack(self):
            return RequestGuard(super().build_middleware_stack(), self, *self.guard_settings)

    return GuardedApp
