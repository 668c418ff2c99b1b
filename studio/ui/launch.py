"""Starting the web app safely: loopback by default, authentication required anywhere else,
and every request through ``studio.ui.guard`` (Host, Origin, login, size checks) first."""

from __future__ import annotations

import getpass
import ipaddress
import os
import stat
import sys
from pathlib import Path

from studio import config

# The largest file the browser may upload (a dataset on the Data tab). Gradio copies an upload
# into its cache before the studio stores it, so an upload costs twice its size in disk; 2 GB is
# far above the datasets a fine-tuning run on one machine reads, and a larger file is imported
# without any copy by typing its path on the Data tab.
MAX_UPLOAD_BYTES = 2 << 30


class LaunchError(Exception):
    """A launch refused before any socket is opened; the message tells the user what to do."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def warn(message: str) -> None:
    print(f"peft-studio ui: warning: {message}", file=sys.stderr, flush=True)


def parse_credentials(text: str, where: str) -> tuple[str, str]:
    user, sep, password = text.strip().partition(":")
    if not sep or not user or not password:
        raise LaunchError(f"{where}: expected 'user:password', got {text.strip()!r}")
    return user, password


def read_auth_file(path: str | Path) -> list[tuple[str, str]]:
    """One ``user:password`` per line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        mode = path.stat().st_mode
    except OSError as exc:
        raise LaunchError(f"cannot read auth file {path}: {exc.strerror or exc}") from exc
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        warn(f"{path} can be read by other users of this machine; chmod 600 {path}")
    pairs = [
        parse_credentials(line, f"{path}, line {number}")
        for number, line in enumerate(lines, start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not pairs:
        raise LaunchError(f"auth file {path} holds no 'user:password' line")
    return pairs


def resolve_auth(host: str, auth: str | None, auth_file: str | None) -> list[tuple[str, str]] | None:
    """The credentials to enforce, refusing a non-loopback host that has none."""
    pairs: list[tuple[str, str]] = []
    if auth and ":" not in auth:
        if not auth.strip():
            raise LaunchError("--auth: expected USER or USER:PASSWORD, got an empty value")
        pairs.append((auth.strip(), prompt_password(auth.strip())))
    elif auth:
        warn("--auth USER:PASSWORD shows the password to every user of this machine "
             "(ps, /proc/<pid>/cmdline) and keeps it in your shell history. Prefer "
             "--auth-file FILE (one user:password per line, chmod 600), or --auth USER "
             "to be asked for the password.")
        pairs.append(parse_credentials(auth, "--auth"))
    if auth_file:
        pairs.extend(read_auth_file(auth_file))
    if not pairs and not is_loopback(host):
        raise LaunchError(
            f"Refusing to listen on {host} without a password: anyone who can reach this machine "
            "could train, read and delete your projects. Add --auth-file FILE with one "
            "user:password per line (chmod 600), or --auth USER to be asked for the password "
            "(--auth user:password works too, but shows the password in ps); or leave out "
            f"--host to stay on {config.DEFAULT_HOST}."
        )
    return pairs or None


def prompt_password(user: str) -> str:
    """``--auth USER``: the password typed at the terminal, never echoed nor in ``ps``."""
    if not sys.stdin.isatty():
        raise LaunchError(f"--auth {user} asks for the password on a terminal, and there is "
                          "none here: use --auth-file FILE (one user:password per line).")
    try:
        password = getpass.getpass(f"Password for {user}: ")
    except (EOFError, KeyboardInterrupt) as exc:
        raise LaunchError("no password given") from exc
    if not password:
        raise LaunchError(f"--auth {user}: the password is empty")
    return password


def serve(host: str, port: int, auth: list[tuple[str, str]] | None, block: bool = True,
          max_upload: int = MAX_UPLOAD_BYTES):
    """Build and launch the app behind the request guard. Returns the Blocks (already closed
    when ``block``)."""
    # Read when gr.Blocks is built; anything but the string "True" keeps analytics off.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from gradio.routes import ORJSONResponse

    from studio.ui.app import CSS, build_app
    from studio.ui.guard import guarded_app_class

    demo = build_app()
    demo.queue(default_concurrency_limit=4)
    # Gradio's App with the guard outside all its layers; FastAPI's own /docs and /openapi.json
    # are turned off (nothing of ours uses them).
    app = guarded_app_class()(host, max_upload, default_response_class=ORJSONResponse,
                              docs_url=None, redoc_url=None, openapi_url=None)
    demo.launch(
        _app=app,
        server_name=host,
        server_port=port,
        auth=auth,
        max_file_size=max_upload,
        run_history=False,  # its routes can use this machine's Hugging Face token
        prevent_thread_lock=not block,
        inbrowser=False,
        ssr_mode=False,  # no Node server: one process, one port
        footer_links=[],
        mcp_server=False,
        quiet=False,
        css=CSS,
    )
    return demo
