"""The guard's policies on their own, without a server: which Host names
``PEFT_STUDIO_ALLOWED_HOSTS`` admits, and the login throttle's schedule (issue 12, items 1 and 3;
``test_security_http.py`` drives them through a real app)."""

from __future__ import annotations

import pytest

REBIND = "rebind.attacker.example"

@pytest.mark.parametrize("host,allowed", [
    ("127.0.0.1:7860", True), ("studio.lan:7860", True), ("localhost:9000", True),
    ("studio.lan:9000", False), ("localhost:9001", False), (f"{REBIND}:7860", False)])
def test_extra_names_and_tunnel_ports_come_from_the_environment(monkeypatch, host, allowed):
    """``PEFT_STUDIO_ALLOWED_HOSTS=studio.lan,localhost:9000``: a DNS name on the app's port,
    and an SSH tunnel's other port for one name only."""
    from studio.ui.guard import RequestGuard

    monkeypatch.setenv("PEFT_STUDIO_ALLOWED_HOSTS", "studio.lan, localhost:9000")
    guard = RequestGuard(None, object(), "127.0.0.1", None)
    scope = {"type": "http", "path": "/", "server": ("127.0.0.1", 7860), "scheme": "http"}
    refusal = guard.refusal(scope, {"host": host, "origin": f"http://{host}"})
    assert (refusal is None) == allowed, refusal


def test_throttle_waits_grow_are_capped_and_forgotten():
    """The schedule on a clock of our own: 5 free attempts, then 1, 2, 4 ... s between
    attempts, never more than 300 s, and an address idle for an hour starts afresh."""
    from studio.ui.login_gate import LoginThrottle, client_key

    now = [1000.0]
    throttle = LoginThrottle(clock=lambda: now[0], max_clients=3)
    assert [throttle.attempt("a") for _ in range(5)] == [0.0] * 5
    waits = []
    for _ in range(12):
        wait = throttle.attempt("a")
        waits.append(wait)
        now[0] += wait
        assert throttle.attempt("a") == 0.0  # allowed once the wait is over
    assert waits == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]
    assert throttle.attempt("b") == 0.0  # another address is not slowed
    now[0] += 3601
    assert throttle.attempt("a") == 0.0  # forgotten after an idle hour
    throttle.succeeded("a")
    for key in ("c", "d", "e", "f"):
        throttle.attempt(key)
    assert len(throttle._clients) == 3  # bounded under a spray of addresses
    assert client_key("2001:db8::1") == client_key("2001:db8::ffff") == "2001:db8::/64"
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
