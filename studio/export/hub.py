"""Pushing an export to the Hugging Face hub: ``peft-studio export RUN --push-to-hub REPO``.

An export takes minutes; finding out afterwards that the push could never have worked wastes
them. So ``preflight`` checks everything it can first, each failing at once with what to do: a
valid repo id (``huggingface_hub``'s own rule), the hub not switched off (``HF_HUB_OFFLINE``), a
token from the usual login (``huggingface_hub.get_token``: ``HF_TOKEN`` or ``hf auth login``),
and the hub answering a short-timeout ``whoami`` at its endpoint (``HF_ENDPOINT`` honoured),
which also tells a refused or read-only token apart. ``push_export`` then creates the repo and
uploads the export folder (its README.md is the model card) with ``huggingface_hub``'s
``create_repo`` + ``upload_folder``; a failure there keeps the export and says where it is and
the exact ``hf upload`` command that pushes it later. The token never appears in a message.

The environment is read when a check runs, not when ``huggingface_hub`` was imported, and the
endpoint is passed to ``HfApi`` explicitly, so the check and the upload talk to the same hub.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.export.target import MARKER

PROBE_TIMEOUT_S = 5.0  # the reachability check: a hub that does not answer in 5 s will not take gigabytes
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}  # huggingface_hub.constants.ENV_VARS_TRUE_VALUES
LOGIN_HELP = ("log in with `hf auth login` (or set HF_TOKEN to a token with write access, from "
              "{endpoint}/settings/tokens)")


class HubError(Exception):
    """A push that cannot start or did not finish, with what to do; ``interrupted``: Ctrl-C."""

    def __init__(self, message: str, interrupted: bool = False):
        super().__init__(message)
        self.interrupted = interrupted


@dataclass(frozen=True)
class HubTarget:
    """Where a checked push goes; the token is kept out of ``repr`` (tracebacks, logs)."""

    repo_id: str
    endpoint: str
    user: str | None
    token: str = field(repr=False)


def endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def offline() -> str | None:
    """The variable that switches the hub off (``HF_HUB_OFFLINE``, or ``TRANSFORMERS_OFFLINE``
    where that is unset, as huggingface_hub reads them), or None."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(name)
        if value:
            return name if value.strip().upper() in TRUE_VALUES else None
    return None


def check_repo_id(repo_id: str) -> str:
    """The repo id, stripped, or ``HubError`` saying what a repo id looks like."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id = (repo_id or "").strip()
    if repo_id.startswith(("http://", "https://")):
        raise HubError(f"--push-to-hub takes a repo id (user/name or name), not a URL: {repo_id!r}; "
                       "nothing was exported")
    try:
        validate_repo_id(repo_id)
        if not repo_id:
            raise HFValidationError("it is empty")
    except HFValidationError as exc:
        raise HubError(f"--push-to-hub {repo_id!r} is not a valid repo id ({exc}): use user/name or name, "
                       "letters, digits, '-', '_' and '.', at most 96 characters; nothing was exported") from None
    return repo_id


def preflight(repo_id: str) -> HubTarget:
    """Everything about a push that can be checked before the export is written; ``HubError``
    with what to do at the first thing that fails."""
    repo_id = check_repo_id(repo_id)
    hub = endpoint()
    switch = offline()
    if switch:
        raise HubError(f"{switch} is set, so the hub is switched off in this shell and nothing can be "
                       f"pushed to {repo_id}; nothing was exported. Unset it (`unset {switch}`) to push, or "
                       "export without --push-to-hub and push the folder later with `hf upload`")
    from huggingface_hub import get_token

    try:
        token = get_token()
    except Exception as exc:  # HF_OIDC_RESOURCE set and its exchange failed: huggingface_hub raises
        raise HubError(f"could not get a Hugging Face token ({str(exc)[:200]}); nothing was exported") from None
    if not token:
        raise HubError(f"no Hugging Face token to push to {repo_id}: {LOGIN_HELP.format(endpoint=hub)}; "
                       "nothing was exported")
    return HubTarget(repo_id, hub, _whoami(hub, token, repo_id), token)


def _whoami(hub: str, token: str, repo_id: str) -> str | None:
    """The token's user name (None where the endpoint does not say), after a short request that
    proves the hub answers; ``HubError`` when it does not, or refuses the token."""
    import httpx

    try:
        answer = httpx.get(f"{hub}/api/whoami-v2", headers={"authorization": f"Bearer {token}"},
                           timeout=PROBE_TIMEOUT_S, follow_redirects=True)
    except httpx.HTTPError as exc:
        reason = _redact(f"{type(exc).__name__}: {exc}", token)[:200]
        raise HubError(f"cannot reach the hub at {hub} ({reason}); check the network or proxy "
                       "(HTTPS_PROXY), or HF_ENDPOINT if you use a mirror; nothing was exported") from None
    if answer.status_code == 401:
        raise HubError(f"the hub at {hub} refused the token (HTTP 401: expired or revoked?); "
                       f"{LOGIN_HELP.format(endpoint=hub)}; nothing was exported")
    if answer.status_code != 200:  # a mirror without whoami: it answered, the upload will tell the rest
        return None
    try:
        data = answer.json()
    except ValueError:
        return None
    role = ((data.get("auth") or {}).get("accessToken") or {}).get("role") if isinstance(data, dict) else None
    if role == "read":
        raise HubError(f"the token can only read from the hub, and pushing to {repo_id} writes: create a "
                       f"token with write access at {hub}/settings/tokens and log in with it "
                       "(`hf auth login`); nothing was exported")
    return data.get("name") if isinstance(data, dict) else None


def later_command(repo_id: str, folder: str | Path, private: bool) -> str:
    """The ``hf upload`` line (huggingface_hub 2.x's CLI) that pushes ``folder`` as this push would."""
    line = f"hf upload {shlex.quote(repo_id)} {shlex.quote(str(folder))} . --exclude {shlex.quote(MARKER)}"
    return line + (" --private" if private else "")


def push_export(db: Any, row: Any, target: HubTarget, private: bool = False) -> Any:
    """Create ``target``'s repo (if new) and upload the export folder of ``row``; returns the
    export row with the repo URL recorded (``verification["hub_url"]``). ``HubError`` keeping the
    export, with the command that pushes it later, when the upload fails or is interrupted."""
    from huggingface_hub import HfApi

    folder = Path(row.path)
    later = later_command(target.repo_id, folder, private)
    api = HfApi(endpoint=target.endpoint, token=target.token)
    try:
        repo = api.create_repo(target.repo_id, repo_type="model", private=True if private else None, exist_ok=True)
        api.upload_folder(repo_id=repo.repo_id, repo_type="model", folder_path=folder,
                          ignore_patterns=[MARKER],  # our overwrite marker: local bookkeeping only
                          commit_message=f"PEFT Studio export {row.id}: {row.kind} {row.dtype}")
    except KeyboardInterrupt:
        raise HubError(f"interrupted (Ctrl-C) while uploading to {target.repo_id}. The export is complete "
                       f"and kept at {folder}; push it with: {later}", interrupted=True) from None
    except Exception as exc:  # HTTP errors, a dropped connection, a full temp disk: the export stays
        reason = _redact(" ".join(str(exc).split()), target.token)[:400]
        raise HubError(f"the upload to {target.repo_id} on {target.endpoint} failed ({type(exc).__name__}: "
                       f"{reason}). The export is kept at {folder}; push it later with: {later}") from None
    url = str(repo)
    return db.update_export(row.id, verification={**(row.verification or {}), "hub_url": url})


def _redact(text: str, token: str) -> str:
    return text.replace(token, "***") if token else text
