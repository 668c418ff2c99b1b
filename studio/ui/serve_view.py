"""What the Serve tab draws, without widgets: the adapters a project would serve, the status line,
the served-models table and the ready-to-copy ``curl`` and ``openai`` snippets.

Plain functions of the database and of ``studio.serve.process``'s status, so that they are tested
without a browser. The adapters listed before a start are exactly the child's: both come from
``studio.serve.catalog.project_catalog``.
"""

from __future__ import annotations

import json
import shlex
import time

import pandas as pd

from studio.compare.sources import AdapterSourceError, detect_method
from studio.db import Database
from studio.serve.catalog import CatalogError, project_catalog, served_name
from studio.serve.process import ServeStatus, local_url
from studio.ui import labels

TEXT = labels.SERVE
KEY_ENV = "PEFT_STUDIO_API_KEY"
PLANNED_COLUMNS = ["served name", "method", "folder"]
MODEL_COLUMNS = ["id", "parent"]
HELLO = "Hello! Who are you?"


def run_choices(db: Database, project_id: int | None) -> list[tuple[str, int]]:
    """The project's runs the catalog would serve, as (label, run id), oldest first."""
    if project_id is None or db.get_project(project_id) is None:
        return []
    try:
        served = project_catalog(db, project_id, "all").adapters
    except CatalogError:
        return []
    return [(f"#{run.id} {run.name}", run.id) for run in sorted(db.list_runs(project_id), key=lambda r: r.id)
            if served_name(run.name, run.id) in served]


def runs_arg(picked: list[int] | None) -> str:
    """The ``--runs`` value: "all" when nothing is picked."""
    ids = sorted({int(p) for p in picked or []})
    return ",".join(map(str, ids)) if ids else "all"


def planned(db: Database, project_id: int | None, runs: str = "all") -> tuple[pd.DataFrame, str]:
    """(the adapters a server for this project would serve, a note): names as the child names them."""
    if project_id is None or db.get_project(project_id) is None:
        return pd.DataFrame(columns=PLANNED_COLUMNS), TEXT["no_project"]
    try:
        catalog = project_catalog(db, project_id, runs)
    except CatalogError as exc:
        return pd.DataFrame(columns=PLANNED_COLUMNS), TEXT["cannot_list"].format(reason=exc)
    rows = []
    for name, folder in catalog.adapters.items():
        try:
            method = detect_method(folder)
        except AdapterSourceError:  # the catalog checked it; a folder changed since is the child's to refuse
            method = "?"
        rows.append({"served name": name, "method": method, "folder": str(folder)})
    notes = [f"Base model: `{catalog.base_name}` (from {catalog.base_source})."]
    if not rows:
        notes.append(TEXT["no_adapters"])
    if catalog.notes:
        notes.append(TEXT["skipped"].format(notes="; ".join(catalog.notes)))
    return pd.DataFrame(rows, columns=PLANNED_COLUMNS), " ".join(notes)


def status_text(status: ServeStatus) -> str:
    if status.state == "running":
        since = time.strftime("%H:%M:%S", time.localtime(status.started_at or time.time()))
        return TEXT["running"].format(url=status.url, pid=status.pid, since=since, models=status.models,
                                      log=status.log)
    if status.state == "starting":
        return TEXT["starting"].format(seconds=0)
    if status.reason:
        return TEXT["stopped"].format(reason=status.reason)
    return TEXT["not_running"]


def models_frame(models: list[dict]) -> pd.DataFrame:
    """GET /v1/models' list as a table: id and parent first, then any other field the server sends
    (``object`` and ``created`` are the same for every row, so left out)."""
    extra = sorted({k for m in models for k in m if k not in (*MODEL_COLUMNS, "object", "created")})
    rows = [{k: _cell(m.get(k)) for k in (*MODEL_COLUMNS, *extra)} for m in models]
    return pd.DataFrame(rows, columns=[*MODEL_COLUMNS, *extra])


def _cell(value):
    return json.dumps(value) if isinstance(value, (dict, list)) else value


def example_model(models: list[dict]) -> str | None:
    """The model the snippets name: the first adapter (what this server is for), else the base."""
    adapters = [m["id"] for m in models if m.get("parent") and isinstance(m.get("id"), str)]
    if adapters:
        return adapters[0]
    bases = [m["id"] for m in models if isinstance(m.get("id"), str)]
    return bases[0] if bases else None


def snippet_url(status: ServeStatus) -> str:
    """The URL a client on this machine uses (a wildcard host is not one to connect to)."""
    return local_url(status.url or "")


def curl_snippet(url: str, model: str, keyed: bool) -> str:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": HELLO}], "max_tokens": 64})
    lines = [f"curl {shlex.quote(url + '/chat/completions')}", '-H "Content-Type: application/json"']
    if keyed:  # the key itself is never shown: it stays in the user's environment
        lines.append(f'-H "Authorization: Bearer ${KEY_ENV}"')
    lines.append(f"-d {shlex.quote(body)}")
    return " \\\n  ".join(lines)


def python_snippet(url: str, model: str, keyed: bool) -> str:
    key = f'os.environ["{KEY_ENV}"]' if keyed else '"none"  # this server asks for no key'
    head = "import os\n\n" if keyed else ""
    return (f"{head}from openai import OpenAI\n\n"
            f"client = OpenAI(base_url={json.dumps(url)}, api_key={key})\n"
            f"reply = client.chat.completions.create(\n"
            f"    model={json.dumps(model)},\n"
            f"    messages=[{{\"role\": \"user\", \"content\": {json.dumps(HELLO)}}}],\n"
            f"    max_tokens=64,\n)\n"
            f"print(reply.choices[0].message.content)\n")


def snippets(status: ServeStatus, models: list[dict]) -> tuple[str, str, str]:
    """(curl, python, a note) for the running server; placeholders while it is not running."""
    model = example_model(models)
    if not status.running or model is None:
        return "", "", TEXT["snippet_idle"]
    keyed = bool(status.settings and status.settings.api_key)
    url = snippet_url(status)
    return curl_snippet(url, model, keyed), python_snippet(url, model, keyed), TEXT["key_note"] if keyed else ""
