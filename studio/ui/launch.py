"""Starting the web app safely: loopback by default, authentication required anywhere else."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from studio import config


class LaunchError(Exception):
    """A launch refused before any socket is opened; the message tells the user what to do."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


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
    except OSError as exc:
        raise LaunchError(f"cannot read auth file {path}: {exc.strerror or exc}") from exc
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
    if auth:
        pairs.append(parse_credentials(auth, "--auth"))
    if auth_file:
        pairs.extend(read_auth_file(auth_file))
    if not pairs and not is_loopback(host):
        raise LaunchError(
            f"Refusing to listen on {host} without a password: anyone who can reach this machine "
            "could train, read and delete your projects. Add --auth user:password, or "
            "--auth-file FILE with one user:password per line; or leave out --host to stay on "
            f"{config.DEFAULT_HOST}."
        )
    return pairs or None


def serve(host: str, port: int, auth: list[tuple[str, str]] | None, block: bool = True):
    """Build and launch the app. Returns the Blocks (already closed when ``block``)."""
    # Read when gr.Blocks is built; anything but the string "True" keeps analytics off.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from studio.ui.app import CSS, build_app

    demo = build_app()
    demo.queue(default_concurrency_limit=4)
    demo.launch(
        server_name=host,
        server_port=port,
        auth=auth,
        prevent_thread_lock=not block,
        inbrowser=False,
        ssr_mode=False,  # no Node server: one process, one port
        footer_links=[],
        mcp_server=False,
        quiet=False,
        css=CSS,
    )
    return demo
