"""What a visitor may do before logging in, when the app requires a login.

Gradio checks the login on some routes only (``/gradio_api/cancel``, ``/reset``, ``/heartbeat``,
``/stream/*`` and ``/startup-events`` answer anyone), and answers wrong passwords as fast as they
come. ``studio.ui.guard`` asks this module two questions before Gradio sees a request: is this
path part of the login page (public), and does the request carry a live Gradio session; and it
keeps a ``LoginThrottle`` in front of ``POST /login``.

The session check reads Gradio's own login state (``App.tokens`` and the two ``access-token-*``
cookies ``POST /login`` sets), so there is one login, Gradio's, checked at one more place.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict

from starlette.requests import cookie_parser

# What the browser fetches to draw the login page and to log in (measured with chromium on
# Gradio 6.31: the page, its scripts and styles, fonts, the theme, POST /login). Everything else
# needs a session, including /config and every /gradio_api/* route.
PUBLIC_PATHS = frozenset({
    "/", "/login", "/login/", "/logout", "/theme.css", "/favicon.ico", "/robots.txt",
    "/manifest.json", "/gradio_api/login_check", "/gradio_api/login_check/",
    "/gradio_api/theme.css",
    # Gradio's launch() calls it, without a session, to start the queue; it runs the app's
    # start-up once and is a no-op after that.
    "/gradio_api/startup-events",
})
PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/")
LOGIN_PATHS = frozenset({"/login", "/login/"})


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def session_user(app, headers: dict[str, str]) -> str | None:
    """The user a request is logged in as, from Gradio's session cookies; None if none."""
    # Starlette's parser, as Gradio's own check uses: lenient with the other cookies that
    # pages on other localhost ports leave (cookies ignore ports).
    cookies = cookie_parser(headers.get("cookie", ""))
    for name in (f"access-token-{app.cookie_id}", f"access-token-unsecure-{app.cookie_id}"):
        token = cookies.get(name)
        if token is not None and token in app.tokens:
            return app.tokens[token]
    return None


def client_key(address: str | None) -> str:
    """Whose failures these are: the client's IP; an IPv6 client by its /64, which one
    machine usually holds whole (per-address counting would let it walk the range)."""
    if not address:
        return "unknown"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6:
        if ip.ipv4_mapped is not None:  # ::ffff:192.0.2.1 is the IPv4 client 192.0.2.1
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class LoginThrottle:
    """Slows password guessing per client: ``free`` attempts, then each next attempt waits
    ``2 ** (n - free)`` seconds after the previous one, at most ``max_delay``.

    An attempt counts when it *starts* (so a burst of parallel guesses is throttled too) and a
    successful login clears the client's count. The wait is capped and the count forgotten
    after ``forget_after`` idle seconds, so nobody (the loopback user included) is locked out
    for good; and failures are counted per client, so one address guessing never slows another.
    """

    def __init__(self, free: int = 5, max_delay: float = 300.0, forget_after: float = 3600.0,
                 max_clients: int = 10_000, clock=time.monotonic):
        self.free, self.max_delay, self.forget_after = free, max_delay, forget_after
        self.max_clients, self.clock = max_clients, clock
        self._clients: OrderedDict[str, tuple[int, float]] = OrderedDict()  # key: (count, last)

    def delay(self, count: int) -> float:
        if count < self.free:
            return 0.0
        return min(2.0 ** (count - self.free), self.max_delay)

    def wait_for(self, key: str) -> float:
        """Seconds this client must still wait before its next attempt (0: it may try now)."""
        now = self.clock()
        count, last = self._clients.get(key, (0, now))
        if now - last > self.forget_after:
            self._clients.pop(key, None)
            return 0.0
        return max(0.0, last + self.delay(count) - now)

    def attempt(self, key: str) -> float:
        """Count an attempt; returns 0 if it may go ahead, else the seconds to wait (and the
        attempt is not counted: waiting, not retrying harder, is what shortens the wait)."""
        wait = self.wait_for(key)
        if wait > 0:
            return wait
        count, _ = self._clients.pop(key, (0, 0.0))
        self._clients[key] = (count + 1, self.clock())
        while len(self._clients) > self.max_clients:  # bounded memory under a spray of addresses
            self._clients.popitem(last=False)
        return 0.0

    def succeeded(self, key: str) -> None:
        self._clients.pop(key, None)


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
