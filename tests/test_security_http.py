"""The request guard through the real app: real processes, real HTTP with forged headers.

Two apps per module (starting one costs seconds): ``open_app`` is ``peft-studio ui`` with the
defaults (loopback, no login); ``locked_app`` is ``serve`` on 0.0.0.0 with a login and a 1 MB
upload cap, as an exposed studio would run. Issue 12, items 1 (DNS rebinding, cross-origin
calls) and 3 (login gaps when exposed).
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, wait_for_http

from studio.db import Database

REBIND = "rebind.attacker.example"
USER, PASSWORD = "ada", "correct horse"


class App:
    def __init__(self, proc, port: int, home: Path, log):
        self.proc, self.port, self.home, self.log = proc, port, home, log

    def request(self, method: str, path: str, headers: dict | None = None, body: bytes = b"",
                host: str | None = None, address: str = "127.0.0.1"):
        """(status, lower-cased headers, body); the Host header as given, never corrected."""
        conn = http.client.HTTPConnection(address, self.port, timeout=10)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", host if host is not None else f"127.0.0.1:{self.port}")
            for name, value in (headers or {}).items():
                conn.putheader(name, value)
            if body or method in ("POST", "PUT"):
                if "Content-Length" not in (headers or {}):
                    conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            response = conn.getresponse()
            return response.status, _header_dict(response.getheaders()), _read(response)
        finally:
            conn.close()


def _read(response, seconds: float = 10.0) -> bytes:
    """The body, or what arrived within ``seconds``: an event stream (what an unguarded app
    answers on some routes) never ends by itself."""
    deadline, body = time.monotonic() + seconds, b""
    while time.monotonic() < deadline:
        try:
            chunk = response.read1(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        body += chunk
    return body


def _header_dict(pairs) -> dict[str, str]:
    """Lower-cased names; a repeated header (Set-Cookie) joined by newlines."""
    out: dict[str, str] = {}
    for name, value in pairs:
        name = name.lower()
        out[name] = f"{out[name]}\n{value}" if name in out else value
    return out


def _start(tmp: Path, argv: list[str], port: int) -> App:
    home = tmp / "home"
    home.mkdir()
    env = {**os.environ, "PEFT_STUDIO_HOME": str(home), "GRADIO_ANALYTICS_ENABLED": "False",
           "HF_HUB_OFFLINE": "1"}
    env.pop("PEFT_STUDIO_ALLOWED_HOSTS", None)
    log = open(tmp / "app.log", "a")
    proc = subprocess.Popen([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    app = App(proc, port, home, log)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/", proc)
    except BaseException:
        _stop(app)
        raise
    return app


def _stop(app: App) -> None:
    app.proc.terminate()
    try:
        app.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        app.proc.kill()
    app.log.close()


@pytest.fixture(scope="module")
def open_app(tmp_path_factory):
    port = free_port()
    app = _start(tmp_path_factory.mktemp("open-app"), ["-m", "studio", "ui", "--port", str(port)],
                 port)
    yield app
    _stop(app)


@pytest.fixture(scope="module")
def locked_app(tmp_path_factory):
    port = free_port()
    code = ("from studio.ui.launch import serve; "
            f"serve('0.0.0.0', {port}, [({USER!r}, {PASSWORD!r})], max_upload=1 << 20)")
    app = _start(tmp_path_factory.mktemp("locked-app"), ["-c", code], port)
    yield app
    _stop(app)


def _call(data: list) -> tuple[dict, bytes]:
    return {"Content-Type": "application/json"}, json.dumps({"data": data}).encode()


def _project_names(app: App) -> set[str]:
    db = Database(app.home / "projects" / "studio.db")
    try:
        return {project.name for project in db.list_projects()}
    finally:
        db.close()


# -- item 1: DNS rebinding and cross-origin calls, default settings ---------------------------

CANCEL = b'{"session_hash":"x","fn_index":0,"event_id":"y"}'
JOIN = json.dumps({"data": ["Rebound"], "fn_index": 0, "session_hash": "rebind00"}).encode()
ROUTES = [("GET", "/", b""), ("GET", "/config", b""), ("GET", "/gradio_api/info", b""),
          ("POST", "/gradio_api/call/create_project", _call(["Rebound"])[1]),
          ("POST", "/gradio_api/queue/join", JOIN),
          ("GET", "/gradio_api/queue/data?session_hash=rebind00", b""),
          ("POST", "/gradio_api/cancel", CANCEL),
          ("POST", "/gradio_api/upload", b"x"), ("GET", "/gradio_api/file=/etc/hostname", b""),
          ("OPTIONS", "/gradio_api/call/create_project", b"")]


@pytest.mark.parametrize("method,path,body", ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_rebinding_host_is_refused_before_any_route(open_app, method, path, body):
    port = open_app.port
    headers = {"Origin": f"http://{REBIND}:{port}", "Content-Type": "application/json",
               "Access-Control-Request-Method": "POST"}
    status, response_headers, text = open_app.request(method, path, headers, body,
                                                      host=f"{REBIND}:{port}")
    assert status == 421, (status, text[:200])
    assert b"DNS rebinding" in text
    assert "access-control-allow-origin" not in response_headers
    assert "Rebound" not in _project_names(open_app)


@pytest.mark.parametrize("host", ["127.0.0.1:1", "localhost", "evil.localhost:{port}", "",
                                  "127.0.0.1:{port}@evil.example", "localhost.evil.example:{port}"])
def test_other_hosts_and_ports_are_refused(open_app, host):
    status, _, _ = open_app.request("GET", "/config", host=host.format(port=open_app.port))
    assert status == 421


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST.:{port}",
                                  "[::1]:{port}", "127.0.0.2:{port}"])
def test_loopback_names_are_served(open_app, host):
    status, headers, _ = open_app.request("GET", "/config", host=host.format(port=open_app.port))
    assert status == 200
    assert headers["content-security-policy"] == "frame-ancestors 'self'"


def test_same_origin_call_works_and_creates_the_project(open_app):
    port = open_app.port
    headers, body = _call(["Same origin"])
    headers["Origin"] = f"http://localhost:{port}"
    status, response_headers, text = open_app.request(
        "POST", "/gradio_api/call/create_project", headers, body, host=f"localhost:{port}")
    assert status == 200, text
    event_id = json.loads(text)["event_id"]
    status, _, text = open_app.request("GET", f"/gradio_api/call/create_project/{event_id}",
                                       host=f"localhost:{port}")
    assert status == 200 and b"event: complete" in text
    assert "Same origin" in _project_names(open_app)


@pytest.mark.parametrize("origin", ["http://evil.example", f"http://{REBIND}", "null",
                                    "http://127.0.0.1:1", "file://",
                                    "http://localhost.evil.example"])
@pytest.mark.parametrize("method,path", [("POST", "/gradio_api/call/create_project"),
                                         ("OPTIONS", "/gradio_api/call/create_project"),
                                         ("GET", "/config")])
def test_foreign_origin_is_refused_without_acao(open_app, origin, method, path):
    headers, body = _call(["Cross origin"])
    headers.update({"Origin": origin, "Access-Control-Request-Method": "POST"})
    status, response_headers, _ = open_app.request(method, path, headers,
                                                   body if method == "POST" else b"")
    assert status == 403
    assert "access-control-allow-origin" not in response_headers
    assert "Cross origin" not in _project_names(open_app)


def test_cross_site_fetch_without_origin_is_refused_but_a_link_opens_the_page(open_app):
    fetch = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"}
    assert open_app.request("GET", "/config", fetch)[0] == 403
    framed = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate",
              "Sec-Fetch-Dest": "iframe"}
    assert open_app.request("GET", "/", framed)[0] == 403
    link = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate",
            "Sec-Fetch-Dest": "document"}
    assert open_app.request("GET", "/", link)[0] == 200


def test_run_history_is_off_and_uploads_are_capped_by_default(open_app):
    for path in ("/gradio_api/runs", "/gradio_api/run-history/buckets",
                 "/gradio_api/run-history/records"):
        assert open_app.request("GET", path)[0] == 404, path
    # 3 GiB announced, nothing sent: refused from the header, before any byte is read.
    started = time.monotonic()
    status, _, text = open_app.request("POST", "/gradio_api/upload",
                                       {"Content-Type": "multipart/form-data; boundary=x",
                                        "Content-Length": str(3 << 30)})
    assert status == 413 and b"over the 2.0 GiB limit" in text
    assert time.monotonic() - started < 5


# -- item 3: an exposed studio with a login ---------------------------------------------------

def _login(app: App, password: str, address: str = "127.0.0.1"):
    body = f"username={USER}&password={password.replace(' ', '+')}".encode()
    return app.request("POST", "/login", {"Content-Type": "application/x-www-form-urlencoded"},
                       body, address=address, host=f"{address}:{app.port}")


def _session(app: App) -> dict:
    """Cookie header of a fresh login (waiting out any throttle a previous test left)."""
    deadline = time.monotonic() + 20
    while True:
        status, headers, text = _login(app, PASSWORD)
        if status == 200:
            break
        assert status == 429 and time.monotonic() < deadline, (status, text)
        time.sleep(float(headers["retry-after"]))
    cookies = headers["set-cookie"].split("\n")
    return {"Cookie": "; ".join(cookie.split(";")[0] for cookie in cookies)}


LOGIN_REQUIRED = [("POST", "/gradio_api/cancel", CANCEL), ("POST", "/gradio_api/reset", CANCEL),
                  ("GET", "/gradio_api/heartbeat/abcdef", b""),
                  ("GET", "/config", b""), ("GET", "/gradio_api/info", b""),
                  ("POST", "/gradio_api/queue/join", JOIN), ("POST", "/gradio_api/upload", b"x"),
                  ("POST", "/gradio_api/stream/abc", b"{}")]


@pytest.mark.parametrize("method,path,body", LOGIN_REQUIRED,
                         ids=[f"{m} {p}" for m, p, _ in LOGIN_REQUIRED])
def test_every_api_route_needs_the_login(locked_app, method, path, body):
    status, _, text = locked_app.request(method, path, {"Content-Type": "application/json"}, body)
    assert status == 401, (status, text[:200])


def test_login_page_public_run_history_gone_cancel_after_login(locked_app):
    assert locked_app.request("GET", "/")[0] == 200  # the login page itself
    for path in ("/gradio_api/runs", "/gradio_api/run-history/buckets"):
        assert locked_app.request("GET", path)[0] == 404, path
    cookie = _session(locked_app)
    status, _, _ = locked_app.request("POST", "/gradio_api/cancel",
                                      {**cookie, "Content-Type": "application/json"}, CANCEL)
    assert status == 200
    assert locked_app.request("GET", "/config", cookie)[0] == 200


def test_rebinding_host_is_refused_when_exposed_too(locked_app):
    status, headers, _ = locked_app.request("GET", "/", {"Origin": f"http://{REBIND}"},
                                            host=f"{REBIND}:{locked_app.port}")
    assert status == 421 and "access-control-allow-origin" not in headers


def test_wrong_passwords_are_throttled_then_the_right_one_works(locked_app):
    _session(locked_app)  # a clean count for this client
    answers = [_login(locked_app, "wrong")[0] for _ in range(5)]
    assert answers == [400] * 5
    status, headers, text = _login(locked_app, "wrong")
    assert status == 429 and headers["retry-after"] == "1" and b"try again in 1 s" in text
    assert _login(locked_app, PASSWORD)[0] == 429  # the wait applies to every attempt
    time.sleep(1.1)
    assert _login(locked_app, PASSWORD)[0] == 200  # waited: the right password logs in
    assert _login(locked_app, "wrong")[0] == 400  # and the count starts again


def test_a_burst_of_parallel_guesses_is_throttled_too(locked_app):
    _session(locked_app)
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: _login(locked_app, "wrong")[0], range(30)))
    assert answers.count(400) == 5 and answers.count(429) == 25


def test_one_address_guessing_does_not_lock_out_another(locked_app):
    other = _lan_address()
    if other is None:
        pytest.skip("no non-loopback IPv4 address on this machine")
    _session(locked_app)
    for _ in range(6):
        _login(locked_app, "wrong", address=other)
    assert _login(locked_app, "wrong", address=other)[0] == 429
    assert _login(locked_app, PASSWORD)[0] == 200  # the loopback user is not slowed down


def _lan_address() -> str | None:
    import socket

    import psutil

    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family == socket.AF_INET and not entry.address.startswith("127."):
                return entry.address
    return None


def test_uploads_over_the_cap_are_refused(locked_app):
    cookie = _session(locked_app)
    boundary = "studio-test-boundary"

    def form(size: int) -> bytes:
        return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
                f"filename=\"data.jsonl\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                ).encode() + b"x" * size + f"\r\n--{boundary}--\r\n".encode()

    headers = {**cookie, "Content-Type": f"multipart/form-data; boundary={boundary}"}
    status, _, text = locked_app.request("POST", "/gradio_api/upload", headers, form(100_000))
    assert status == 200 and b"data.jsonl" in text
    # Announced over the cap: refused from the header, before a byte of the body is read.
    status, _, text = locked_app.request("POST", "/gradio_api/upload",
                                         {**headers, "Content-Length": str(3 << 20)})
    assert status == 413 and b"over the 1.0 MiB limit" in text
    # Sent without a length (chunked): counted as it arrives, refused once past the cap.
    status, text = _streamed_upload(locked_app, headers, form(4 << 20))
    assert status == 413, text[:300]


def _streamed_upload(app: App, headers: dict, body: bytes) -> tuple[int, bytes]:
    """A chunked POST whose body is written from a thread, as a browser streams it: the
    server may answer (and close) before the body is all sent."""
    import socket
    import threading

    sock = socket.create_connection(("127.0.0.1", app.port), timeout=20)
    head = [f"POST /gradio_api/upload HTTP/1.1", f"Host: 127.0.0.1:{app.port}",
            "Transfer-Encoding: chunked", *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())

    def write():
        try:
            for i in range(0, len(body), 65536):
                piece = body[i:i + 65536]
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed: what is being tested

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.read()
    finally:
        writer.join(timeout=20)
        sock.close()
