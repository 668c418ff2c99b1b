"""``peft-studio serve``: a local OpenAI-compatible endpoint, one base model in memory and many
adapters over it, the adapter chosen per request by its name in ``model``.

What it serves (``studio.serve.catalog``): a project's finished runs (``--project``, ``--runs``),
any adapter folder named with ``--adapter NAME=PATH``, over the project's base or ``--model``.
Every refusal (no key on an exposed host, a project or run that does not exist, a folder that
is not an adapter) is one line on stderr and exit code 2, before any model is loaded. When it
listens it prints one line on stdout, ``PEFT Studio serving N models at http://HOST:PORT/v1``
(the real port, also for ``--port 0``), and SIGTERM or Ctrl-C stop it cleanly with exit code 0.
``--engine vllm`` hands the same catalog to vLLM's own server (``studio.serve.vllm``).

Started by the app (``studio.serve.process``), it also gets ``--lifeline-fd FD`` (hidden from
``--help``): the read end of a pipe whose write end only the app holds. When the app dies,
however it dies (SIGKILL included), the read sees EOF and the server stops as on SIGTERM, so
it never keeps the port and the model with no app to manage it. Run from a terminal, without
the flag, nothing watches the parent: it serves until stopped, as before.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import stat
import sys
import threading
import time
from pathlib import Path

from studio import config

PROG = "peft-studio serve"
# After the lifeline's EOF and our SIGTERM, how long a clean stop may take before the server's
# process group is killed: what the app's own Stop allows (process.STOP_GRACE). It covers a
# SIGTERM that lands while no handler stops anything (between the model load and uvicorn's own
# handlers) and a load stuck in native code.
LIFELINE_GRACE_S = 10.0


class ServeRefused(Exception):
    """A start refused before anything is loaded; the message says what to do."""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    sv = sub.add_parser(
        "serve", help="serve adapters over an OpenAI-compatible API (one base, many adapters)",
        description="Serve a project's adapters (and any adapter folder) over one base model, "
                    "through OpenAI's API: the request's 'model' names the adapter.")
    sv.add_argument("--project", default=None, help="serve this project's finished runs (name or id)")
    sv.add_argument("--runs", default="all", metavar="all|ID,...",
                    help="which of the project's runs: all (default) or ids, e.g. 3,5,8")
    sv.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                    help="also serve the adapter folder PATH as NAME (repeatable)")
    sv.add_argument("--model", default=None, metavar="SOURCE",
                    help="the base model (default: the project's, else the embedded model)")
    sv.add_argument("--host", default=config.DEFAULT_HOST,
                    help="address to listen on (default 127.0.0.1; any other needs an API key)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    keys = sv.add_mutually_exclusive_group()
    keys.add_argument("--api-key", default=None, metavar="KEY",
                      help="require this key (Authorization: Bearer KEY); it shows in ps and your "
                           "shell history: prefer --api-key-file")
    keys.add_argument("--api-key-file", default=None, metavar="FILE",
                      help="require the key in FILE (its first line; chmod 600): not visible in ps")
    sv.add_argument("--max-active", type=int, default=8, metavar="N",
                    help="adapters attached at once; others load on first request, the least "
                         "recently used is detached (default 8)")
    sv.add_argument("--allow-adapter-admin", action="store_true",
                    help="enable POST /v1/adapters and DELETE /v1/adapters/{name} (loading is "
                         "confined to the project's runs and exports folders)")
    sv.add_argument("--cors-origin", action="append", default=[], metavar="URL",
                    help="let a web page at URL (e.g. http://localhost:3000, a browser chat UI) "
                         "call the API; by default browsers may not call it from other pages")
    sv.add_argument("--engine", choices=["studio", "vllm"], default="studio",
                    help="studio (default; any adapter, CPU or GPU) or vllm (LoRA adapters on a "
                         "CUDA GPU, vLLM's own server)")
    sv.add_argument("--trust-remote-code", action="store_true",
                    help="allow the base model's own Python code (only for sources you trust)")
    # The app's lifeline (see the module's docstring); never typed by a user.
    sv.add_argument("--lifeline-fd", type=int, default=None, help=argparse.SUPPRESS)
    sv.set_defaults(handler=serve)


def _fail(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    return 2


def read_key(args: argparse.Namespace) -> str | None:
    """The API key from ``--api-key`` or the first line of ``--api-key-file``."""
    if args.api_key is not None:
        if not args.api_key.strip():
            raise ServeRefused("--api-key is empty")
        return args.api_key.strip()
    if args.api_key_file is None:
        return None
    path = Path(args.api_key_file).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        raise ServeRefused(f"cannot read --api-key-file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    key = (text.strip().splitlines() or [""])[0].strip()
    if not key:
        raise ServeRefused(f"--api-key-file {path} is empty")
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(f"{PROG}: warning: {path} can be read by other users of this machine; chmod 600 {path}",
              file=sys.stderr, flush=True)
    return key


def build_catalog(args: argparse.Namespace):
    """The catalog the arguments describe; ``CatalogError`` saying what is wrong."""
    from studio.serve.catalog import Catalog, CatalogError, base_name_for, parse_adapter_args, project_catalog

    extra = parse_adapter_args(args.adapter)
    if args.project is not None:
        from studio.db import Database

        catalog = project_catalog(Database(), args.project, args.runs, model=args.model)
    elif args.runs != "all":
        raise CatalogError("--runs picks runs of a project: add --project")
    else:
        source = args.model or config.DEFAULT_MODEL
        catalog = Catalog(source, base_name_for(source))
    for name, folder in extra.items():
        if name in catalog.adapters or name == catalog.base_name:
            raise CatalogError(f"--adapter {name}: the name is already served (a run's or the base's)")
        catalog.adapters[name] = folder
    return catalog


def watch_lifeline(fd: int, grace: float = LIFELINE_GRACE_S) -> None:
    """Stop this server when the read end ``fd`` sees EOF: the app that holds the write end is
    gone. A daemon thread blocks on the read (no polling); on EOF it says so on stderr (the log)
    and sends this process SIGTERM, which takes the same clean path as the app's Stop (during
    the load and while serving). If the process still lives ``grace`` seconds later, its group
    is killed (the app started it as a group leader; vLLM's server is in that group).
    ``ServeRefused`` when ``fd`` is not an open pipe or file."""
    try:
        os.fstat(fd)
    except OSError:
        raise ServeRefused(f"--lifeline-fd {fd} is not an open file descriptor") from None

    def wait_for_eof() -> None:
        try:
            while os.read(fd, 4096):
                pass  # the app never writes; anything written is not a reason to stop
        except OSError:
            pass  # a broken read means the same: the other end cannot be relied on
        print(f"{PROG}: the app that started this server is gone: stopping", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)  # a clean stop ends the process, and this daemon thread with it
        print(f"{PROG}: not stopped {grace:g} s after SIGTERM: killing it", file=sys.stderr, flush=True)
        leader = os.getpgrp() == os.getpid()  # never kill a group we did not start
        if leader:
            os.killpg(os.getpgrp(), signal.SIGKILL)
        else:
            os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=wait_for_eof, name="serve-lifeline", daemon=True).start()


def serve(args: argparse.Namespace) -> int:
    from studio.serve.catalog import CatalogError
    from studio.ui.launch import is_loopback

    try:
        if args.lifeline_fd is not None:
            watch_lifeline(args.lifeline_fd)  # first: an app that dies during the checks counts too
        key = read_key(args)
        if key is None and not is_loopback(args.host):
            raise ServeRefused(f"refusing to listen on {args.host} without an API key: anyone who can "
                               "reach this machine could use it. Add --api-key-file FILE (one line, "
                               "chmod 600), or leave out --host to stay on 127.0.0.1.")
        if not 0 <= args.port <= 65535:
            raise ServeRefused(f"--port {args.port} is not a port (0 to 65535)")
        if args.max_active < 1:
            raise ServeRefused(f"--max-active must be at least 1, got {args.max_active}")
        catalog = build_catalog(args)
    except (ServeRefused, CatalogError) as exc:
        return _fail(str(exc))
    for note in catalog.notes:
        print(f"{PROG}: {note}", file=sys.stderr, flush=True)
    if args.engine == "vllm":
        from studio.serve import vllm

        return vllm.run(catalog, host=args.host, port=args.port, api_key=key, max_active=args.max_active)
    try:
        sock = _bind(args.host, args.port)
    except OSError as exc:
        return _fail(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
    return _run(args, catalog, key, sock)


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a busy port is refused at once, and
    ``--port 0`` knows its real port for the ready line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _run(args: argparse.Namespace, catalog, key: str | None, sock: socket.socket) -> int:
    import asyncio

    import uvicorn

    from studio.compare.sources import AdapterSourceError
    from studio.serve.api import create_app
    from studio.serve.engine import ServeEngine

    stopping = {"signal": None}

    def stop_on(sig, _frame):  # until uvicorn installs its own: a signal during the load
        stopping["signal"] = sig
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, stop_on) for sig in (signal.SIGTERM, signal.SIGINT)}
    engine = None
    try:
        try:
            engine = ServeEngine.load(catalog.base_source, catalog.base_name,
                                      trust_remote_code=args.trust_remote_code, max_active=args.max_active)
            app = create_app(engine, catalog, api_key=key, host=args.host, port=sock.getsockname()[1],
                             allow_adapter_admin=args.allow_adapter_admin,
                             cors_origins=tuple(args.cors_origin))
        except KeyboardInterrupt:
            return 0  # stopped while loading: nothing was served
        except (AdapterSourceError, ValueError) as exc:
            return _fail(str(exc))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                               timeout_graceful_shutdown=5))
        # uvicorn re-raises the signal it caught once it has shut down; these handlers take it
        # (a clean stop is exit code 0, not death by SIGTERM).
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda s, f: stopping.update(signal=s))
        asyncio.run(_serve(server, sock, len(engine.models()), args.host))
        return 0
    finally:
        if engine is not None:
            engine.close()
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


async def _serve(server, sock: socket.socket, count: int, host: str) -> None:
    import asyncio

    async def announce():
        while not server.started and not server.should_exit:
            await asyncio.sleep(0.05)
        if server.started:
            shown = f"[{host}]" if ":" in host else host
            print(f"PEFT Studio serving {count} models at http://{shown}:{sock.getsockname()[1]}/v1",
                  flush=True)

    task = asyncio.create_task(announce())
    await server.serve(sockets=[sock])
    task.cancel()
