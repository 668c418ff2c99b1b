"""Browser test of the Serve tab: a project with one finished run; the tab lists the adapter it
will serve, Start brings up a real ``peft-studio serve`` child (from the app process), the status
and the models table come from that server, the curl line shown is sent as it is (its URL, its
body) and answers; Stop ends the child and the status says so."""

from __future__ import annotations

import json
import os
import re
import shlex
import urllib.request

import pytest

from browser import browser_page
from test_e2e_shell import shot
from test_serve_process import served_project

pytestmark = pytest.mark.e2e


@pytest.fixture
def project(studio_home, tiny_chat_model):
    from studio.db import Database

    return served_project(Database(), tiny_chat_model, name="Serve e2e")


def shows(page, selector: str, text: str, timeout: float = 30_000) -> None:
    """Wait until the element's visible text holds ``text`` (a table renders a cell twice, once
    hidden, so a text locator is ambiguous)."""
    page.wait_for_function("([sel, text]) => (document.querySelector(sel) || {}).innerText?.includes(text)",
                           arg=[selector, text], timeout=timeout)


def send_curl(line: str) -> dict:
    """Send what a curl line shown in the tab asks for (its URL, headers and -d body) with urllib."""
    args = shlex.split(line.replace("\\\n", " "))
    assert args[0] == "curl", args
    url, headers, body = args[1], {}, None
    for flag, value in zip(args[2:], args[3:]):
        if flag == "-H":
            name, _, text = value.partition(":")
            headers[name.strip()] = text.strip()
        elif flag == "-d":
            body = value.encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=60) as response:
        return json.loads(response.read())


def test_start_the_server_see_its_models_use_the_curl_line_and_stop(project, running_app, tmp_path):
    _, run = project
    adapter = f"lora-on-dates-{run.id}"
    with browser_page() as page:
        page.goto(running_app)
        page.wait_for_selector("#app-header")
        page.get_by_role("tab", name="Serve").click()
        shows(page, "#serve-planned", adapter)
        # Exposed without a key: refused in the tab with the reason, nothing started.
        host = page.locator("#serve-host textarea, #serve-host input").first
        host.fill("0.0.0.0")
        host.press("Tab")
        page.locator("#serve-start").click()
        shows(page, "#serve-status", "without an API key")
        host.fill("127.0.0.1")
        host.press("Tab")
        port = page.locator("#serve-port input")
        port.fill("0")  # a free port: the test must not depend on 8000 being free
        port.press("Tab")
        page.wait_for_function("() => document.querySelector('#serve-port input').value === '0'")
        page.locator("#serve-start").click()

        shows(page, "#serve-status", "Running at", timeout=180_000)
        status = page.locator("#serve-status").inner_text()
        url = re.search(r"http://127\.0\.0\.1:\d+/v1", status).group(0)
        pid = int(re.search(r"pid (\d+)", status).group(1))
        shows(page, "#serve-models", adapter)
        shows(page, "#serve-curl .cm-content", url)
        shot(page, tmp_path, "serve-running")

        curl = page.locator("#serve-curl .cm-content").inner_text()
        assert f"{url}/chat/completions" in curl and f'"model": "{adapter}"' in curl, curl
        answer = send_curl(curl)
        assert answer["model"] == adapter and answer["object"] == "chat.completion"
        assert isinstance(answer["choices"][0]["message"]["content"], str)
        assert answer["usage"]["completion_tokens"] >= 1

        page.locator("#serve-stop").click()
        shows(page, "#serve-status", "Stopped.")
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert adapter not in page.locator("#serve-models").inner_text()
