"""The serving engine: one base model in memory, many adapters over it, one scheduler thread.

``submit`` puts a request in a bounded waiting queue (``Busy`` when full) and returns its
``Completion`` handle at once. The scheduler thread owns every model: it admits waiting requests
(attaching their adapter through the ``AdapterPool``, the LRU adapter memory), puts each in a
lane (``lanes.py``) and lets the lanes with work take turns, one step each (round robin; a
prefill is a step), so no adapter's requests starve another's.

The only module of ``studio.serve`` that imports torch at module level (with those it uses).
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from studio.serve import pool as pool_module
from studio.serve.completion import (AdapterInUse, AdapterLoadFailed, Busy, Completion, InvalidRequest,
                                     ModelEntry, PromptTooLong, Sampling, ServeError, UnknownModel)
from studio.serve.generate_lane import GenerateLane
from studio.serve.lanes import DecodeLane, Row, full_attention_cache
from studio.serve.sampling import TextStream, new_generator



@dataclass
class _Request:
    name: str
    completion: Completion
    prompt_ids: list[int]
    sampling: Sampling


class ServeEngine:
    def __init__(self, base_model: Any, tokenizer: Any, base_name: str, *, max_active: int = 8,
                 max_waiting: int = 64, max_batch: int = 16):
        self.base = base_model.eval()
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.max_waiting, self.max_batch = max_waiting, max_batch
        config = base_model.config
        self.max_context = int(getattr(config, "max_position_embeddings", None) or 2048)
        self.vocab_size = base_model.get_input_embeddings().num_embeddings
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = _eos_ids(tokenizer, base_model)
        self.pool = pool_module.AdapterPool(self.base, max_active)
        self._lock = threading.Lock()  # the registry and the waiting queue
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[_Request] = deque()
        self._running = self._pending = self._max_batch_seen = 0
        # Rows admitted into a lane and not yet released (the scheduler releases a row's adapter
        # after the step that ended it, a moment after its client saw the last token).
        self._admitted: dict[int, Row] = {}  # by id(row)
        self._released = threading.Condition(self._lock)  # notified when rows' adapters are released
        self._closed = False
        # Our decode loop pads and concatenates caches: only for plain full-attention caches.
        self._decode_loop = full_attention_cache(base_model)
        if not self._decode_loop:
            print(f"serve: {type(base_model).__name__}'s cache is not plain full attention (sliding window or "
                  "hybrid): requests are answered through generate (new requests wait for the running batch "
                  "to end instead of joining it), prompt and prefix tuning one request at a time",
                  file=sys.stderr)
        if self._decode_loop:
            self._mixed = DecodeLane(self._mixed_model, self.pad_id, max_batch, self._fail_rows, mixed=True,
                                     base=self.base)
        else:
            self._mixed = GenerateLane(self._mixed_model, self.pad_id, max_batch,
                                       self._fail_rows, mixed=True)
        self._solo: dict[str, Any] = {}
        self._unregistered: list[pool_module.Adapter] = []
        self._order: list[Any] = [self._mixed]  # the lanes, in turn order
        self._turn = 0
        self._thread = threading.Thread(target=self._loop, daemon=True, name="serve-scheduler")
        self._thread.start()

    def _mixed_model(self) -> Any:
        """The base's rows and plain LoRA rows share one forward: the LoRA view while any is
        attached (base rows there are ``__base__``), else the base model itself."""
        return self.pool.mixed_view if self.pool.mixed_view is not None else self.base

    @classmethod
    def load(cls, source: str, base_name: str, *, device: str | None = None, dtype: str | None = None,
             trust_remote_code: bool = False, **options: Any) -> "ServeEngine":
        from studio import models

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
        tokenizer = models.load_tokenizer(source, trust_remote_code=trust_remote_code)
        model = models.load_model(source, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        return cls(model, tokenizer, base_name, **options)

    # ---- the catalog ------------------------------------------------------------------------
    def register(self, name: str, folder: Path) -> ModelEntry:
        folder = Path(folder).expanduser()
        with self._lock:
            pool_module.check_name(name, self.base_name, self.pool.adapters)
            adapter = self.pool.add(name, folder)
            return self._entry(adapter)

    def unregister(self, name: str) -> None:
        """Forget ``name``; AdapterInUse while a request for it is waiting or being answered. A
        request whose answer already ended (its client may call this at once) is not in use: we
        wait the moment until the scheduler releases it."""
        with self._lock:
            adapter = self._adapter(name)
            deadline = time.monotonic() + 10.0
            while adapter.inflight:
                rows = [r for r in self._admitted.values() if r.adapter is adapter]
                if not rows or any(not r.completion.done for r in rows) or time.monotonic() > deadline:
                    break
                self._released.wait(0.05)
            if adapter.inflight or any(r.name == name for r in self._waiting):
                raise AdapterInUse(f"adapter {name!r} is answering requests; try again when they finish")
            self._unregistered.append(self.pool.remove(name))  # detached by the scheduler, between steps
            self._wake.notify()

    def models(self) -> list[ModelEntry]:
        with self._lock:
            base = ModelEntry(self.base_name, None, None, None, True, True)
            return [base, *(self._entry(a) for a in self.pool.adapters.values())]

    def _entry(self, adapter: pool_module.Adapter) -> ModelEntry:
        return ModelEntry(adapter.name, self.base_name, adapter.method, adapter.folder,
                          adapter.view is not None, adapter.mixable)

    def _adapter(self, name: str) -> pool_module.Adapter:
        adapter = self.pool.adapters.get(name)
        if adapter is None:
            raise UnknownModel(f"the model {name!r} does not exist; GET /v1/models lists the "
                               f"{len(self.pool.adapters) + 1} models served")
        return adapter

    def tokenizer_for(self, name: str) -> Any:
        """The adapter folder's own tokenizer when it saved one (its chat template), else the base's."""
        if name == self.base_name:
            return self.tokenizer
        with self._lock:
            adapter = self._adapter(name)
        if adapter.tokenizer is None:
            adapter.tokenizer = self.tokenizer
            if (adapter.folder / "tokenizer_config.json").is_file():
                from transformers import AutoTokenizer

                try:
                    adapter.tokenizer = AutoTokenizer.from_pretrained(str(adapter.folder))
                except (OSError, ValueError) as exc:
                    print(f"serve: {adapter.folder}: its tokenizer did not load ({exc}); using the base's",
                          file=sys.stderr)
        return adapter.tokenizer

    # ---- requests ---------------------------------------------------------------------------
    def submit(self, name: str, prompt_ids: list[int], sampling: Sampling) -> Completion:
        prompt_ids = [int(t) for t in prompt_ids]
        virtual = 0
        if name != self.base_name:
            with self._lock:
                virtual = self._adapter(name).virtual_tokens
        self._check(prompt_ids, sampling)
        if virtual + len(prompt_ids) + sampling.max_tokens > self.max_context:
            extra = f" (with the adapter's {virtual} virtual tokens)" if virtual else ""
            raise PromptTooLong(f"this model's context is {self.max_context} tokens; the prompt has "
                                f"{virtual + len(prompt_ids)}{extra} and max_tokens asks {sampling.max_tokens}")
        tokenizer = self.tokenizer_for(name)
        completion = Completion(len(prompt_ids), TextStream(tokenizer, tuple(sampling.stop)),
                                sampling.max_tokens, set() if sampling.ignore_eos else self.eos_ids)
        with self._lock:
            if self._closed:
                raise ServeError("the server is shutting down")
            waiting = len(self._waiting) + self._pending
            if waiting >= self.max_waiting:
                raise Busy(f"the server is busy: {waiting} requests are already waiting (at most "
                           f"{self.max_waiting}); retry shortly")
            self._waiting.append(_Request(name, completion, prompt_ids, sampling))
            self._wake.notify()
        return completion

    def _check(self, prompt_ids: list[int], sampling: Sampling) -> None:
        """Refuse what would break a shared batch for everyone in it (an id outside the vocabulary
        fails the whole forward) or what has no answer (an empty prompt)."""
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty: give at least one token", "prompt")
        bad = next((t for t in prompt_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"token id {bad} is outside this model's vocabulary (0..{self.vocab_size - 1})",
                                 "prompt")
        if not isinstance(sampling.max_tokens, int) or sampling.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be a whole number of at least 1, not {sampling.max_tokens!r}",
                                 "max_tokens")
        if not 0 <= sampling.temperature <= 100:
            raise InvalidRequest(f"temperature must be between 0 and 100, not {sampling.temperature!r}", "temperature")
        if not 0 <= sampling.top_p <= 1:
            raise InvalidRequest(f"top_p must be between 0 and 1, not {sampling.top_p!r}", "top_p")

    def stats(self) -> dict:
        with self._lock:
            return {"active_adapters": [a.name for a in self.pool.active()],
                    "running": self._running, "waiting": len(self._waiting) + self._pending,
                    "resident_bytes": self.pool.resident_bytes(), "max_batch_seen": self._max_batch_seen}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # ---- the scheduler thread -----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while (not self._closed and not self._waiting and not self._unregistered
                       and not self._lanes_with_work()):
                    self._wake.wait()
                if self._closed:
                    break
                self._admit()
            lane = self._next_lane()
            if lane is not None:
                self._step(lane)
            else:  # only requests waiting for a slot that nothing is using: look again shortly
                with self._lock:
                    self._wake.wait(0.05)
        self._drain()

    def _admit(self) -> None:
        """Waiting requests into lanes (under the lock). A request whose adapter cannot be
        attached yet (every slot busy) keeps its place, and so do the adapter requests behind
        it: otherwise a steady stream to the attached adapters would keep them busy forever and
        starve it. Base rows hold no slot and go on."""
        for adapter in self._unregistered:
            self.pool.detach(adapter)
        self._unregistered = []
        still: deque[_Request] = deque()
        blocked = False  # an earlier request waits for a slot
        for request in self._waiting:
            completion = request.completion
            if completion._cancel_requested():
                completion._finish("cancelled")
                continue
            adapter = None
            if request.name != self.base_name:
                if request.name not in self.pool.adapters:
                    completion._fail(UnknownModel(f"the model {request.name!r} was unregistered"))
                    continue
                if blocked:
                    still.append(request)
                    continue
                try:
                    adapter = self.pool.acquire(request.name)
                except pool_module.LoadFailed as exc:
                    completion._fail(AdapterLoadFailed(str(exc)))
                    continue
                if adapter is None:
                    still.append(request)
                    blocked = True
                    continue
            row = Row(completion, adapter.key if adapter is not None and adapter.mixable else None,
                      request.prompt_ids, request.sampling, new_generator(request.sampling.seed), adapter)
            self._lane_for(adapter).add(row)
            self._admitted[id(row)] = row
        self._waiting = still
        self._pending = sum(len(lane.pending) for lane in self._order)
        self._forget_lanes()

    def _lane_for(self, adapter: pool_module.Adapter | None):
        """The mixed lane for the base and plain LoRA; a lane of its own for any other adapter."""
        if adapter is None or adapter.mixable:
            return self._mixed
        lane = self._solo.get(adapter.name)
        if lane is None or lane.view is not adapter.view:
            def model_for(adapter=adapter):
                return adapter.view

            if adapter.prompt_learning and self._decode_loop:
                # Virtual tokens through our loop, from PEFT's own ``get_prompt``, so that these
                # rows too join and leave a running batch (PEFT's generate takes a batch at a
                # time). The lane runs the view's inner model: PEFT's forward would add the
                # virtual tokens a second time.
                lane = DecodeLane(lambda adapter=adapter: adapter.view.get_base_model(), self.pad_id,
                                  self.max_batch, self._fail_rows, virtual=adapter.view.get_prompt)
            elif adapter.prompt_learning:
                # A cache we cannot pad (sliding window, hybrid): PEFT's own generate (with
                # ``studio.peft_compat``), one row at a time as PEFT does not batch virtual
                # tokens beside left padding the way its forward sees them.
                lane = GenerateLane(model_for, self.pad_id, 1, self._fail_rows)
            elif not self._decode_loop:
                lane = GenerateLane(model_for, self.pad_id, self.max_batch, self._fail_rows)
            else:
                lane = DecodeLane(model_for, self.pad_id, self.max_batch, self._fail_rows)
            lane.view = adapter.view  # a re-attached adapter is a new view: a new lane
            self._solo[adapter.name] = lane
            self._order.append(lane)
        return lane

    def _forget_lanes(self) -> None:
        """Drop the lanes of detached adapters (they have no rows: only idle adapters detach)."""
        for name, lane in list(self._solo.items()):
            adapter = self.pool.adapters.get(name)
            if not lane.has_work() and (adapter is None or adapter.view is not lane.view):
                del self._solo[name]
                self._order.remove(lane)

    def _lanes_with_work(self) -> bool:
        return any(lane.has_work() for lane in self._order)

    def _next_lane(self):
        """Round robin: the next lane after the last one served that has work."""
        for _ in range(len(self._order)):
            self._turn = (self._turn + 1) % len(self._order)
            lane = self._order[self._turn]
            if lane.has_work():
                return lane
        return None

    def _step(self, lane) -> None:
        ended = lane.step()
        with self._lock:
            for row in ended:
                self._admitted.pop(id(row), None)
                if row.adapter is not None:
                    self.pool.release(row.adapter)
            if ended:
                self._released.notify_all()
            self._running = sum(len(l.running) for l in self._order)
            self._pending = sum(len(l.pending) for l in self._order)
            self._max_batch_seen = max(self._max_batch_seen, len(lane.running))

    def _drain(self) -> None:
        """Closing: cancel everything, and let each lane end its rows (a generate thread ends)."""
        with self._lock:
            for request in self._waiting:
                request.completion._finish("cancelled")
            self._waiting.clear()
        for lane in self._order:
            for row in lane.pending:
                row.completion._finish("cancelled")
            lane.pending = []
            for row in lane.running:
                row.completion.cancel()
            while lane.has_work():
                self._step(lane)

    def _fail_rows(self, rows: list[Row], exc: BaseException) -> None:
        print(f"serve: a generation failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        for row in rows:
            row.completion._fail(ServeError(f"generation failed: {type(exc).__name__}: {exc}"))


def _eos_ids(tokenizer: Any, model: Any) -> set[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids



