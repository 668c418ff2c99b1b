"""The hand-off to vLLM: its own OpenAI server with ``--enable-lora`` and the servable adapters.

``peft-studio serve --engine vllm`` is for a user who outgrows the studio's engine (a GPU,
many clients). vLLM loads only plain PEFT LoRA adapters, so every adapter is checked first
against the rules vLLM itself applies when it loads one (``vllm/lora/peft_helper.py``,
``vllm/lora/lora_model.py``, checked against vLLM 0.33):

- PEFT type ``LORA`` (not DoRA: ``use_dora``; no ``lora_bias``, ``bias`` "none", no aLoRA,
  layer replication, BD-LoRA or QALoRA; an init that changes the base weights — PiSSA, OLoRA,
  CorDA, LoftQ — is refused);
- rank (and every ``rank_pattern`` rank) at most 512, the largest ``--max-lora-rank`` choice;
- ``modules_to_save`` only ``classifier`` / ``score`` (a saved ``lm_head`` copy is refused);
- weights only LoRA's A/B matrices, in ``adapter_model.safetensors``; each one on a module the
  base really has as a matrix (when the base is on disk here).

Every other adapter (IA3, prompt and prefix tuning, LoHa, LoKr, VeRA, AdaLoRA, the studio's
bottleneck adapters) gets its reason in words, and the command serves only the rest.

Nothing here imports torch or vllm at module level: the UI and the CLI ask ``unavailable()``
through ``importlib.util.find_spec`` and a GPU probe in a child process (``studio.sysinfo``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from studio import models
from studio.ui.launch import is_loopback
from studio.compare.sources import (BOTTLENECK_CONFIG, PEFT_CONFIG, PEFT_WEIGHTS, AdapterSourceError,
                                    detect_method)

# vLLM's LoRAConfig.max_lora_rank is a Literal of these values (vllm/config/lora.py): the
# --max-lora-rank we pass is the smallest of them that holds the largest adapter rank.
ALLOWED_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# PEFT inits that only set the starting weights (a saved adapter is a plain LoRA); the other
# string inits (PiSSA, OLoRA, CorDA, LoftQ) change the base weights when PEFT loads the adapter.
PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
# Weight names a vLLM LoRA load accepts (its check_unexpected_modules): A/B matrices only.
LORA_WEIGHT_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")
VLLM_MODULES_TO_SAVE = ("classifier", "score")
API_KEY_ENV = "VLLM_API_KEY"  # vLLM reads the key from here when --api-key is absent
NOT_INSTALLED = "vLLM is not installed: pip install vllm (needs an NVIDIA GPU)"
# `vllm serve`, spelled so that it runs in this interpreter's environment (the one probed).
VLLM_SERVE = ("-m", "vllm.entrypoints.cli.main", "serve")


def unavailable() -> str | None:
    """Why vLLM cannot run on this machine, or None when it can.

    ``find_spec`` locates the package without importing it (vllm imports torch and CUDA
    libraries: seconds, and never in the UI process); the GPU is read by
    ``sysinfo.probe_accelerators`` in a child process, cached."""
    if importlib.util.find_spec("vllm") is None:
        return NOT_INSTALLED
    from studio.sysinfo import probe_accelerators

    accel = probe_accelerators()
    if not accel.get("gpus"):
        why = accel.get("error") or f"torch {accel.get('torch')} sees no CUDA device"
        return f"vLLM needs an NVIDIA GPU with CUDA, and this machine has none ({why})"
    return None


# ---------------------------------------------------------------- one adapter's verdict


def adapter_verdict(folder: Path, base_folder: Path | None = None) -> str | None:
    """Why vLLM cannot serve the adapter in ``folder``, or None if it can.

    ``base_folder`` (a local model folder) adds the check that every adapted module is a matrix
    of the base: an adapter trained on another model would fail inside vLLM at the first
    request, after minutes of start-up."""
    folder = Path(folder)
    try:
        method = detect_method(folder)  # safetensors only, a method the studio knows
    except AdapterSourceError as exc:
        return str(exc)
    if (folder / BOTTLENECK_CONFIG).is_file():
        return (f"{method} adapter (the studio's own bottleneck modules, not a PEFT adapter): "
                "vLLM loads only LoRA adapters")
    config = json.loads((folder / PEFT_CONFIG).read_text())
    kind = str(config.get("peft_type", "")).upper()
    if kind != "LORA":
        return f"{method} adapter (PEFT type {kind or 'unknown'}): vLLM loads only LoRA adapters"
    problems = _lora_config_problems(config)
    if problems:
        return "; ".join(problems)
    try:
        names = _weight_names(folder / PEFT_WEIGHTS)
    except (OSError, SafetensorError) as exc:  # a truncated or foreign file
        return f"{folder / PEFT_WEIGHTS}: unreadable ({exc})"
    stray = [name for name in names if not name.endswith(LORA_WEIGHT_SUFFIXES)]
    if stray:
        return (f"it holds weights vLLM does not load beside LoRA's A/B matrices "
                f"({_few(stray)})")
    if base_folder is not None:
        return _base_mismatch(names, Path(base_folder))
    return None


def adapter_rank(folder: Path) -> int:
    """The largest rank of a LoRA adapter (``r`` and every ``rank_pattern`` value)."""
    return _rank(json.loads((Path(folder) / PEFT_CONFIG).read_text()))


def _rank(config: dict[str, Any]) -> int:
    return max([int(config.get("r") or 0), *(int(v) for v in (config.get("rank_pattern") or {}).values())])


def _lora_config_problems(config: dict[str, Any]) -> list[str]:
    """vLLM's own refusals (PEFTHelper._validate_features and validate_legal), in words."""
    problems = []
    if config.get("use_dora"):
        problems.append("DoRA adapter (use_dora): vLLM does not support DoRA")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("it trains biases (bias / lora_bias): vLLM does not load adapter biases")
    saved = [m for m in (config.get("modules_to_save") or []) if m not in VLLM_MODULES_TO_SAVE]
    if saved:
        problems.append(f"it saves whole modules ({', '.join(map(str, saved))} in modules_to_save): "
                        "vLLM accepts only classifier / score there")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in PLAIN_INITS:
        problems.append(f"init_lora_weights={init!r} changes the base weights when loaded: vLLM refuses "
                        "it (convert it to a plain LoRA with PEFT first)")
    for key, what in (("alora_invocation_tokens", "Activated LoRA"), ("layer_replication", "layer replication"),
                      ("use_bdlora", "block-diagonal LoRA"), ("use_qalora", "QALoRA")):
        if config.get(key):
            problems.append(f"it uses {what} ({key}): vLLM does not support it")
    try:
        rank = _rank(config)
    except (TypeError, ValueError):
        return [*problems, "its rank (r / rank_pattern) is not an integer"]
    if rank < 1:
        problems.append(f"rank {rank}: not a LoRA rank")
    elif rank > ALLOWED_MAX_LORA_RANKS[-1]:
        problems.append(f"rank {rank} is above vLLM's largest --max-lora-rank, {ALLOWED_MAX_LORA_RANKS[-1]}")
    return problems


def _weight_names(path: Path) -> list[str]:
    """Tensor names from a safetensors header, through the safetensors library with numpy (no torch)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as handle:
        return list(handle.keys())


def _few(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _base_mismatch(adapter_names: list[str], base_folder: Path) -> str | None:
    """The adapted modules the base in ``base_folder`` lacks as a matrix, or None.

    A PEFT name is ``base_model.model.<module>.lora_A.weight``; the base's own tensor is
    ``<module>.weight``. A tied ``lm_head`` has no tensor of its own: the embedding stands in."""
    try:
        shapes = _base_shapes(base_folder)
    except (OSError, ValueError, SafetensorError):
        shapes = None  # an unreadable base is vLLM's to report, with its own words
    if shapes is None:
        return None  # nothing to check against
    missing = []
    for name in adapter_names:
        module = name.removeprefix("base_model.model.")
        for suffix in LORA_WEIGHT_SUFFIXES:
            module = module.removesuffix(suffix)
        shape = shapes.get(module + ".weight")
        if shape is None and module.rsplit(".", 1)[-1] == "lm_head":
            shape = shapes.get("model.embed_tokens.weight")
        if shape is None or len(shape) != 2:
            missing.append(module)
    if missing:
        return (f"its target modules do not match the base model in {base_folder}: "
                f"{_few(sorted(set(missing)))}: no such weight matrix there (trained on another model?)")
    return None


def _base_shapes(base_folder: Path) -> dict[str, list[int]] | None:
    """Every tensor's shape in a model folder's safetensors (one file or an index of shards)."""
    from safetensors import safe_open

    index = base_folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
    else:
        files = [p.name for p in base_folder.glob("*.safetensors")]
    if not files:
        return None
    shapes = {}
    for file in files:
        with safe_open(str(base_folder / file), framework="np") as handle:
            for key in handle.keys():
                shapes[key] = handle.get_slice(key).get_shape()
    return shapes


# ---------------------------------------------------------------- the command


def base_model_argument(source: str) -> str:
    """What vLLM's ``--model`` gets for a studio model source.

    A hub id stays a hub id (vLLM downloads it, also on a cluster); a folder is the folder; the
    embedded model and a ``.gguf`` file are the safetensors folder the studio converts them to
    (``studio.models.resolve_source``, converted once and cached), which vLLM loads as any
    Hugging Face folder."""
    parsed = models.parse_source(source)
    if parsed.kind == "hub":
        return parsed.ref
    return str(models.resolve_source(parsed))


def verdicts(catalog) -> dict[str, str | None]:
    """Each catalog adapter's verdict (None: vLLM serves it), checked against the local base."""
    base = _local_base(catalog.base_source)
    return {name: adapter_verdict(Path(folder), base) for name, folder in catalog.adapters.items()}


def _local_base(source: str) -> Path | None:
    try:
        parsed = models.parse_source(source)
        path = models.config_json_path(parsed)  # never converts nor downloads
    except models.ModelSourceError:
        return None
    return path.parent if path is not None and path.is_file() else None


def build_command(catalog, *, host: str, port: int, api_key: str | None, max_active: int,
                  checked: dict[str, str | None] | None = None) -> list[str]:
    """vLLM's OpenAI server for the catalog's base and the adapters vLLM can serve.

    ``api_key`` is deliberately not in the list: argv is readable by every user of the machine
    (``ps``), so the key travels in ``VLLM_API_KEY`` (see ``run``). ``checked`` reuses verdicts
    already computed."""
    if max_active < 1:
        raise ValueError(f"max_active must be at least 1, not {max_active}")
    checked = verdicts(catalog) if checked is None else checked
    servable = {name: Path(catalog.adapters[name]) for name, why in checked.items() if why is None}
    command = [sys.executable, *VLLM_SERVE, base_model_argument(catalog.base_source),
               "--served-model-name", catalog.base_name, "--host", host, "--port", str(port)]
    if servable:
        rank = max(adapter_rank(folder) for folder in servable.values())
        command += ["--enable-lora", "--lora-modules",
                    *(_lora_module(name, folder.resolve(), catalog.base_name) for name, folder in servable.items()),
                    "--max-lora-rank", str(min(r for r in ALLOWED_MAX_LORA_RANKS if r >= rank)),
                    # at most max_active adapters in one batch on the GPU (S-LoRA's active set);
                    # every adapter kept in CPU memory, so an evicted one is not re-read from disk
                    "--max-loras", str(max_active), "--max-cpu-loras", str(max(max_active, len(servable)))]
    return command


def _lora_module(name: str, folder: Path, base_name: str) -> str:
    """One ``--lora-modules`` value: ``name=path``, or vLLM's JSON form when the path holds a comma
    (vLLM reads any value with a comma as JSON). The JSON form also names the parent model."""
    if "," not in str(folder):
        return f"{name}={folder}"
    return json.dumps({"name": name, "path": str(folder), "base_model_name": base_name})


def shown_command(command: list[str], api_key: str | None, portable: bool = False) -> str:
    """The command as a user pastes it into a shell (shell-quoted); the key appears only as
    ``$VLLM_API_KEY``, the variable the user sets on their own machine. ``portable``: spelled
    ``vllm serve ...`` (vLLM's console script), for a machine where this interpreter is not."""
    key = f'{API_KEY_ENV}="${API_KEY_ENV}" ' if api_key else ""
    if portable and command[1:1 + len(VLLM_SERVE)] == list(VLLM_SERVE):
        command = ["vllm", "serve", *command[1 + len(VLLM_SERVE):]]
    return key + shlex.join(command)


def run(catalog, *, host: str, port: int, api_key: str | None, max_active: int) -> int:
    """Print each adapter's verdict and the exact command, then run vLLM (its exit code returned).

    Returns 2 with the reason on stderr when vLLM cannot run here, or when an exposed host has
    no key; the verdicts and the command are printed first even then, so a user can take them to
    a machine that has a GPU. ``port`` 0 picks a free port first (vLLM's command needs a number)."""
    checked = verdicts(catalog)
    for name, why in checked.items():
        print(f"adapter {name}: " + ("served by vLLM" if why is None else f"not served: {why}"), flush=True)
    if not any(why is None for why in checked.values()):
        print("no adapter vLLM can serve: vLLM will serve the base model alone", flush=True)
    try:
        port = port or _free_port(host)
        command = build_command(catalog, host=host, port=port, api_key=api_key, max_active=max_active,
                                checked=checked)
    except (ValueError, OSError, models.ModelSourceError) as exc:
        print(f"cannot build the vLLM command: {exc}", file=sys.stderr, flush=True)
        return 2
    print("vLLM command:", flush=True)
    print(f"  {shown_command(command, api_key)}", flush=True)
    print("on another machine with vLLM and a GPU (copy the folders it names there first):", flush=True)
    print(f"  {shown_command(command, api_key, portable=True)}", flush=True)
    if not api_key and not is_loopback(host):
        print(f"refused: {host} is reachable from other machines; give --api-key or --api-key-file",
              file=sys.stderr, flush=True)
        return 2
    why = unavailable()
    if why is not None:
        print(f"refused: {why}", file=sys.stderr, flush=True)
        return 2
    env = {**os.environ}
    env.pop(API_KEY_ENV, None)  # a stale key in the caller's environment must not open or lock the server
    if api_key:
        env[API_KEY_ENV] = api_key
    served = 1 + sum(why is None for why in checked.values())
    return supervise(command, env, host, port, served)


def supervise(command: list[str], env: dict[str, str], host: str, port: int, served: int,
              poll_s: float = 1.0) -> int:
    """Run the server child until it exits; its exit code is returned (0 when we stopped it).

    Once its ``/health`` answers 200 (vLLM leaves /health outside the key check) this prints the
    studio's ready line, ``PEFT Studio serving N models at http://HOST:PORT/v1``, so the Serve
    panel and scripts wait for vLLM as they wait for the studio's engine. SIGTERM and SIGINT are
    passed on to the child, which shuts down on its own."""
    child = subprocess.Popen(command, env=env)
    stopped = threading.Event()

    def stop(sig, _frame):
        stopped.set()
        if child.poll() is None:
            child.send_signal(sig)

    # Python lets only the main thread set handlers; elsewhere the caller owns the signals.
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
    url_host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    url_host = f"[{url_host}]" if ":" in url_host else url_host
    shown = f"[{host}]" if ":" in host else host

    def announce():
        while child.poll() is None and not stopped.is_set():
            try:
                with urllib.request.urlopen(f"http://{url_host}:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        print(f"PEFT Studio serving {served} models at http://{shown}:{port}/v1", flush=True)
                        return
            except OSError:
                pass  # not listening yet: vLLM loads the model and profiles the GPU first
            stopped.wait(poll_s)

    watcher = threading.Thread(target=announce, daemon=True)
    watcher.start()
    try:
        code = child.wait()
        watcher.join(timeout=10)  # a ready line in flight is printed before we return
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if stopped.is_set() else code


def _free_port(host: str) -> int:
    """A port free on ``host`` now (the OS picks it); vLLM binds it a moment later."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
