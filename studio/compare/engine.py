"""One base model in memory, many adapters attached by name, answering side by side.

The idea of multi-adapter serving (LoRAX, S-LoRA) on a workstation: the base weights are loaded
once and every adapter is attached over them.

How adapters of different kinds share one copy of the base weights: PEFT keeps one tuner type per
``PeftModel`` (a LoRA model cannot also hold IA3 or prompt tuning), and our bottleneck adapters
wrap modules in place. So each adapter group gets a *view*: a structural copy of the base
model's modules whose parameters and buffers are the very same tensor objects as the base's
(``share_base``), with the adapter inserted into the copy. A view costs the module objects
(kilobytes) plus the adapter's own weights; the base model itself is never modified, so the
base column is the untouched model.

- All LoRA-type adapters (LoRA, rsLoRA, LoRA+, QLoRA's adapter, DoRA) live in one PEFT view.
  Plain LoRA columns and the base (``__base__``) are answered by one batched ``generate`` with
  PEFT's ``adapter_names``; DoRA is refused there by PEFT, so it is answered on its own.
- Every other adapter (IA3, which PEFT would silently answer with the active adapter for every
  row; prompt and prefix tuning; LoHa, LoKr, VeRA, AdaLoRA; bottleneck) gets its own view and
  its own ``generate``: "switched".
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from studio.adapters import bottleneck
from studio.compare.generate import generate_rows, render
from studio.compare.settings import ColumnAnswer, GenerationSettings, Messages
from studio.compare.sources import AdapterSourceError, adapter_format, batchable, detect_method

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch, and our base column's name
MAX_ADAPTERS = 6


def share_base(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s module tree whose parameters and buffers ARE the original tensors.

    ``copy.deepcopy`` consults its memo before copying anything, so pre-filling the memo with every
    parameter and buffer makes the copy point at the same objects (tied weights stay tied)."""
    memo: dict[int, Any] = {id(t): t for t in model.parameters()}
    memo.update({id(b): b for b in model.buffers()})
    return copy.deepcopy(model, memo)


def distinct_storage_bytes(models: list[torch.nn.Module]) -> int:
    """Bytes of distinct tensor storage held by ``models``: weights the views share with the base
    count once, so the base plus its views grows by the adapters' own weights only."""
    seen: dict[int, int] = {}
    for model in models:
        for tensor in [*model.parameters(), *model.buffers()]:
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


@dataclass
class Attached:
    name: str  # the column's name as the user sees it
    key: str  # PEFT's adapter name: user text may hold "." (a module path separator) or a PEFT prefix
    method: str
    folder: Path
    path: str  # "batched" or "switched"
    view: Any  # the model that answers for this adapter (the shared LoRA view or its own)


class ChatEngine:
    """The Compare tab's models: ``base`` (never modified) and adapters attached by name."""

    def __init__(self, model: Any, tokenizer: Any, source: str = ""):
        self.base = model.eval()
        self.tokenizer = tokenizer
        self.source = source
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.adapters: dict[str, Attached] = {}
        self._lora_view: Any = None  # the PeftModel holding every LoRA-type adapter
        self._keys = 0
        self._lock = threading.Lock()  # one generation at a time: set_adapter is model state
        self._stop = threading.Event()

    @classmethod
    def load(cls, source: str, dtype: str | None = None, device: str | None = None,
             trust_remote_code: bool = False) -> "ChatEngine":
        from studio import models

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
        tokenizer = models.load_tokenizer(source, trust_remote_code=trust_remote_code)
        model = models.load_model(source, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        return cls(model, tokenizer, source)

    # ---- adapters -------------------------------------------------------------------------
    def add_adapter(self, name: str, folder: str | Path, method: str | None = None) -> Attached:
        name = name.strip()
        if not name or name == BASE:
            raise ValueError(f"an adapter needs a name other than {BASE!r}")
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} is already attached")
        if len(self.adapters) >= MAX_ADAPTERS:
            raise ValueError(f"at most {MAX_ADAPTERS} adapters side by side; remove one first")
        folder = Path(folder).expanduser()
        detected = detect_method(folder)  # raises AdapterSourceError with the reason
        method = method or detected
        kind = adapter_format(folder)
        self._keys += 1
        key = f"column_{self._keys}"
        try:
            if kind == "bottleneck":
                attached = Attached(name, key, method, folder, "switched",
                                    bottleneck.load_bottleneck(share_base(self.base), folder).eval())
            elif kind == "peft_lora":
                attached = Attached(name, key, method, folder, "batched" if batchable(folder) else "switched",
                                    self._load_into_lora_view(key, folder))
            else:
                view = PeftModel.from_pretrained(share_base(self.base), str(folder), adapter_name=key)
                attached = Attached(name, key, method, folder, "switched", view.eval())
        except (RuntimeError, ValueError, KeyError) as exc:
            raise AdapterSourceError(f"{folder} does not fit this base model ({self.source or 'loaded'}): "
                                     f"{str(exc).splitlines()[0][:300]}") from exc
        self.adapters[name] = attached
        return attached

    def _load_into_lora_view(self, key: str, folder: Path) -> Any:
        if self._lora_view is None:
            self._lora_view = PeftModel.from_pretrained(share_base(self.base), str(folder), adapter_name=key).eval()
        else:
            self._lora_view.load_adapter(str(folder), adapter_name=key)
        return self._lora_view

    def remove_adapter(self, name: str) -> None:
        attached = self.adapters.pop(name)
        if attached.view is self._lora_view:
            self._lora_view.delete_adapter(attached.key)
            if not any(a.view is self._lora_view for a in self.adapters.values()):
                self._lora_view = None

    def path(self, column: str) -> str:
        if column == BASE:
            return "batched" if self._batched_names() else "switched"
        return self.adapters[column].path

    def _batched_names(self) -> list[str]:
        return [a.name for a in self.adapters.values() if a.path == "batched"]

    @contextmanager
    def model_for(self, column: str) -> Iterator[Any]:
        """The model that answers as ``column`` (adapter active), for code that generates itself."""
        with self._lock:
            if column == BASE:
                yield self.base
                return
            attached = self.adapters[column]
            if attached.view is self._lora_view:
                self._lora_view.set_adapter(attached.key)
            yield attached.view

    # ---- answering ------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    def answer(self, conversations: dict[str, Messages], settings: dict[str, GenerationSettings] | GenerationSettings,
               system_prompt: str | None = None, on_partial=None) -> dict[str, ColumnAnswer]:
        """Answer the last user message of each column's conversation.

        Columns that share settings and can be batched (the base and plain LoRA adapters) go
        through one ``generate``; the rest are answered one by one. ``on_partial(column, text)``
        is called as tokens arrive."""
        if not isinstance(settings, dict):
            settings = {column: settings for column in conversations}
        settings = {column: s.validated() for column, s in settings.items()}  # all, before any generate
        unknown = [c for c in conversations if c != BASE and c not in self.adapters]
        if unknown:
            raise KeyError(f"no adapter named {unknown[0]!r} is attached")
        with self._lock:
            self._stop.clear()
            answers: dict[str, ColumnAnswer] = {}
            for group, model, extra, path in self._plan(conversations, settings):
                answers.update(self._run(group, model, conversations, settings[group[0]],
                                         system_prompt, on_partial, path, extra))
                if self._stop.is_set():
                    break
            return answers

    def _plan(self, conversations: dict[str, Messages], settings: dict[str, GenerationSettings]):
        """(columns, model, extra generate kwargs, path) per generate call, batched groups first."""
        batch_members = set(self._batched_names()) | {BASE} if self._batched_names() else set()
        batched = [c for c in conversations if c in batch_members]
        by_settings: dict[GenerationSettings, list[str]] = {}
        for column in batched:
            by_settings.setdefault(settings[column], []).append(column)
        for group in by_settings.values():
            keys = [BASE if c == BASE else self.adapters[c].key for c in group]
            yield group, self._lora_view, {"adapter_names": keys}, "batched"
        for column in conversations:
            if column in batch_members:
                continue
            if column == BASE:
                yield [column], self.base, {}, "switched"
                continue
            attached = self.adapters[column]
            if attached.view is self._lora_view:
                self._lora_view.set_adapter(attached.key)  # DoRA: PeftModel refuses it in a mixed batch
            yield [column], attached.view, {}, "switched"

    def _run(self, group: list[str], model: Any, conversations: dict[str, Messages],
             settings: GenerationSettings, system_prompt: str | None, on_partial, path: str,
             extra: dict[str, Any]) -> dict[str, ColumnAnswer]:
        limit = getattr(self.base.config, "max_position_embeddings", 2048) - settings.max_new_tokens
        prompts = [render(self.tokenizer, conversations[c], system_prompt, max(limit, 16)) for c in group]

        def on_step(streamer) -> None:
            if on_partial is not None:
                for column, ids in zip(group, streamer.tokens):
                    on_partial(column, self.tokenizer.decode(ids, skip_special_tokens=True))

        rows, seconds, stopped = generate_rows(model, self.tokenizer, prompts, settings,
                                               stop=self._stop, on_step=on_step, **extra)
        return {column: ColumnAnswer(column, self.tokenizer.decode(ids, skip_special_tokens=True).strip(),
                                     len(ids), secs, path, stopped)
                for column, ids, secs in zip(group, rows, seconds)}

    def stream(self, conversations: dict[str, Messages], settings, system_prompt: str | None = None,
               ) -> Iterator[tuple[dict[str, str], dict[str, ColumnAnswer] | None]]:
        """``answer`` in a background thread: yields (partial texts, None) while tokens arrive,
        then (final texts, answers) once. An error in the thread is raised here."""
        events: queue.Queue = queue.Queue()
        partial: dict[str, str] = {c: "" for c in conversations}

        def work() -> None:
            try:
                events.put(("done", self.answer(conversations, settings, system_prompt,
                                                lambda c, t: events.put(("partial", (c, t))))))
            except BaseException as exc:  # handed to the caller's thread, raised there
                events.put(("error", exc))

        threading.Thread(target=work, daemon=True, name="compare-generate").start()
        while True:
            kind, payload = events.get()
            if kind == "partial":
                partial[payload[0]] = payload[1]
                if events.empty():  # skip frames a slow UI would only drop
                    yield dict(partial), None
            elif kind == "error":
                raise payload
            else:
                yield {c: a.text for c, a in payload.items()}, payload
                return

    # ---- measuring ------------------------------------------------------------------------
    def score(self, columns: list[str], task: str, limit: int = 50) -> dict[str, Any]:
        """Exact match of each column on a sample task's eval split (``studio.evaluate``)."""
        from studio.evaluate import score_task

        results = {}
        for column in columns:
            with self.model_for(column) as model:
                results[column] = score_task(model, self.tokenizer, task, "eval", limit=limit)
        return results

    def score_examples(self, columns: list[str], examples: Any) -> dict[str, Any]:
        """Exact match of each column on an imported dataset's eval rows (an ``EvalExamples``
        from ``studio.evaluate.eval_examples``; whitespace-normalised comparison)."""
        from studio.evaluate import score_examples

        results = {}
        for column in columns:
            with self.model_for(column) as model:
                results[column] = score_examples(model, self.tokenizer, examples)
        return results

    def models(self) -> list[Any]:
        views = {id(a.view): a.view for a in self.adapters.values()}
        return [self.base, *views.values()]

    def resident_bytes(self) -> int:
        """Bytes held by the base and every view (``distinct_storage_bytes``)."""
        return distinct_storage_bytes(self.models())
