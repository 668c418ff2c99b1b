"""The adapter memory of a server (after S-LoRA and LoRAX): which adapters are attached now.

Every registered adapter is a folder on disk; at most ``max_active`` are attached at once. An
adapter is attached on its first request; when every slot is taken, the least recently used
adapter with no request in flight is detached first; when all attached adapters are busy the
request waits (``acquire`` answers None) until one is released.

How adapters share the one copy of the base weights is Compare's: a *view* is a structural copy
of the base whose tensors are the base's own (``studio.compare.engine.share_base``).
- Adapters PEFT can mix in one batch (plain LoRA: ``batchable``) are loaded into ONE PEFT view,
  so rows of different adapters (and base rows, ``__base__``) share one forward.
- Every other adapter (DoRA — PEFT refuses it in a mixed batch —, IA3, prompt/prefix tuning,
  LoHa/LoKr/VeRA/AdaLoRA, our bottleneck) gets its own view, dropped when it is detached.
The base model itself is never modified.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft import PeftConfig, PeftModel

from studio.adapters import bottleneck
from studio.compare.engine import BASE, distinct_storage_bytes, share_base
from studio.compare.sources import AdapterSourceError, adapter_format, batchable, detect_method

NAME = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class LoadFailed(Exception):
    """An adapter folder that was registered but cannot be attached (the engine wraps it)."""


@dataclass
class Adapter:
    name: str
    folder: Path
    method: str
    key: str  # PEFT's adapter name: served names may hold "." (a module path separator)
    mixable: bool  # joins the mixed LoRA batch
    prompt_learning: bool  # virtual tokens (PEFT config ``is_prompt_learning``): a lane of its own
    virtual_tokens: int = 0  # how many: they take context positions before the prompt
    view: Any = None  # the model answering for it while attached
    inflight: int = 0  # requests admitted and not finished
    last_used: float = field(default=0.0)
    tokenizer: Any = None  # its own tokenizer, when the folder saved one (loaded on first use)


def check_name(name: str, base_name: str, taken) -> None:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError(f"adapter name {name!r}: use 1-64 of the characters A-Z a-z 0-9 . _ : -")
    if name in (base_name, BASE):
        raise ValueError(f"adapter name {name!r} is the base model's name")
    if name in taken:
        raise ValueError(f"an adapter named {name!r} is already registered")


def inspect_folder(folder: Path) -> tuple[str, bool, int | None]:
    """(method, mixable, virtual tokens: None unless prompt learning) of an adapter folder;
    AdapterSourceError when it is not one the studio serves (safetensors weights only:
    ``detect_method`` refuses a pickled .bin)."""
    method = detect_method(folder)
    if adapter_format(folder) == "bottleneck":
        if not (folder / bottleneck.WEIGHTS_NAME).is_file():
            raise AdapterSourceError(f"{folder} has no {bottleneck.WEIGHTS_NAME}")
        return method, False, None
    try:
        config = PeftConfig.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError, KeyError, json.JSONDecodeError) as exc:
        raise AdapterSourceError(f"{folder}: unreadable adapter config ({exc})") from exc
    if not config.is_prompt_learning:
        return method, batchable(folder), None
    return method, False, int(getattr(config, "num_virtual_tokens", 0) or 0)


class AdapterPool:
    """The attached adapters over one base model. Used by the scheduler thread only."""

    def __init__(self, base: Any, max_active: int):
        if max_active < 1:
            raise ValueError("max_active must be at least 1")
        self.base = base
        self.max_active = max_active
        self.adapters: dict[str, Adapter] = {}
        self.mixed_view: Any = None  # the PeftModel holding every attached mixable adapter
        self._keys = 0

    # ---- registry -------------------------------------------------------------------------
    def add(self, name: str, folder: Path) -> Adapter:
        method, mixable, virtual = inspect_folder(folder)
        self._keys += 1
        adapter = Adapter(name, folder, method, f"serve_{self._keys}", mixable, virtual is not None, virtual or 0)
        self.adapters[name] = adapter
        return adapter

    def remove(self, name: str) -> Adapter:
        """Forget ``name``; the caller detaches the returned adapter between decoding steps
        (``detach``), never while a forward may be running on its view."""
        return self.adapters.pop(name)

    def active(self) -> list[Adapter]:
        return [a for a in self.adapters.values() if a.view is not None]

    # ---- attaching ------------------------------------------------------------------------
    def acquire(self, name: str) -> Adapter | None:
        """The adapter attached and counted in flight, or None while every slot is busy.
        Raises LoadFailed when its folder cannot be attached to this base."""
        adapter = self.adapters[name]
        if adapter.view is None:
            active = self.active()
            if len(active) >= self.max_active:
                idle = [a for a in active if a.inflight == 0]
                if not idle:
                    return None
                self._detach(min(idle, key=lambda a: a.last_used))
            self._attach(adapter)
        adapter.inflight += 1
        adapter.last_used = time.monotonic()
        return adapter

    def release(self, adapter: Adapter) -> None:
        adapter.inflight = max(0, adapter.inflight - 1)
        adapter.last_used = time.monotonic()

    def _attach(self, adapter: Adapter) -> None:
        from studio import peft_compat

        peft_compat.install()  # PEFT's prompt-learning generate under transformers 5 (the fallback lane)
        folder = adapter.folder
        try:
            if adapter_format(folder) == "bottleneck":
                adapter.view = bottleneck.load_bottleneck(share_base(self.base), folder).eval()
            elif adapter.mixable:
                if self.mixed_view is None:
                    self.mixed_view = PeftModel.from_pretrained(share_base(self.base), str(folder),
                                                                adapter_name=adapter.key).eval()
                else:
                    self.mixed_view.load_adapter(str(folder), adapter_name=adapter.key)
                adapter.view = self.mixed_view
            else:
                adapter.view = PeftModel.from_pretrained(share_base(self.base), str(folder),
                                                         adapter_name=adapter.key).eval()
        except (OSError, RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            adapter.view = None
            raise LoadFailed(f"adapter {adapter.name!r} ({folder}) could not be attached to the base model: "
                             f"{str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}") from exc

    def detach(self, adapter: Adapter) -> None:
        if adapter.view is not None:
            self._detach(adapter)

    def _detach(self, adapter: Adapter) -> None:
        if adapter.view is self.mixed_view and self.mixed_view is not None:
            others = [a for a in self.active() if a.view is self.mixed_view and a is not adapter]
            if others:
                if self.mixed_view.active_adapter == adapter.key:  # PEFT warns when the active one goes
                    self.mixed_view.set_adapter(others[0].key, inference_mode=True)
                self.mixed_view.delete_adapter(adapter.key)
            else:
                self.mixed_view = None  # the last one: drop the whole view
        adapter.view = None

    # ---- memory ---------------------------------------------------------------------------
    def models(self) -> list[Any]:
        views = {id(a.view): a.view for a in self.active()}
        return [self.base, *views.values()]

    def resident_bytes(self) -> int:
        """Bytes held by the base and the attached adapters' views (shared weights once)."""
        return distinct_storage_bytes(self.models())
