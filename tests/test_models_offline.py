"""A hub id on a machine that cannot reach the hub fails in seconds, with the message that says
what to do (issue 15 item 10: it took 20-60 s of the hub client's retries). The hub is played by
real local sockets: one that accepts connections and never answers (a black hole, as behind a
firewall that drops packets), one that answers every request with 404."""

from __future__ import annotations

import http.server
import socket
import threading
import time

import pytest

from studio import models
from studio.models import ModelSourceError


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # conftest sets it for every test


def point_hub_at(monkeypatch, url: str) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", url)


def test_a_silent_hub_fails_fast_with_the_fix(online, monkeypatch):
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)  # connections complete in the kernel; nothing ever answers
        point_hub_at(monkeypatch, f"http://127.0.0.1:{hole.getsockname()[1]}")
        started = time.monotonic()
        with pytest.raises(ModelSourceError) as err:
            models.resolve_source("someorg/not-cached-model")
        took = time.monotonic() - started
    assert took < models.HUB_PROBE_SECONDS + 5, took  # it hung past 150 s before the probe
    message = str(err.value)
    assert "someorg/not-cached-model" in message and "hf download" in message
    assert "did not answer" in message


class NotFound(http.server.BaseHTTPRequestHandler):
    def _answer(self):
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _answer

    def log_message(self, *args):
        pass


def test_a_hub_that_answers_is_asked(online, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        point_hub_at(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(ModelSourceError) as err:
            models.resolve_source("someorg/not-cached-model")
    finally:
        server.shutdown()
        server.server_close()
    # The probe let it through: the hub client itself got the 404.
    assert "did not answer" not in str(err.value) and "hub said" in str(err.value)
