"""``RunSpec``: everything a training run needs, as one JSON-able dataclass.

The only contract between the UI, the CLI and the worker: the UI (or ``peft-studio train
runspec.json``) writes it into the run's row and folder; the worker reads nothing else. Saved as
``projects/<project>/runs/<run>/runspec.json`` so a run can be repeated from the command line.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from studio.data.jsonnum import Decoder, HugeNumber
from studio.methods import SettingError, get_method
from studio.methods.settings import shown

SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LOSS_ON = ("assistant", "all")
OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
# How the worker processes share the model (issue 18): DDP keeps a whole copy per process; FSDP
# and DeepSpeed ZeRO-2/3 shard it, through accelerate (studio/distributed/strategy.py).
DISTRIBUTED = ("ddp", "fsdp", "zero2", "zero3")
CHOICES = {"lr_scheduler": SCHEDULES, "precision": PRECISIONS, "loss_on": LOSS_ON,
           "optimizer": OPTIMIZERS, "distributed": DISTRIBUTED}
MODEL_MAX_CHARS = 4096  # PATH_MAX on Linux: a longer model source cannot be a path either
# Exact-match rows per evaluation unless the spec says: every row is a generated answer (up to 48
# tokens), and the default run evaluates four times. On a busy 2-core CPU one evaluation of 50
# rows took over ten minutes (issue 15); on a GPU 50 take seconds. The default is the CPU's size,
# safe anywhere (runs and bake-offs alike); a GPU user may raise it.
EXACT_MATCH_ROWS = 20


@dataclass(frozen=True)
class Bound:
    """The accepted range of one numeric field; NaN and infinities are always outside it."""

    low: float
    high: float
    low_open: bool = False  # the bound itself is excluded
    high_open: bool = False
    why: str = ""  # what the value means, when the range alone would puzzle

    def check(self, name: str, value: int | float | None) -> None:
        if value is None:  # an optional field left out (dataset_id with a sample task)
            return
        finite = isinstance(value, int) or math.isfinite(value)  # ints never overflow here
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        if not (finite and above and below):
            self.refuse(name, value)

    def refuse(self, name: str, value: Any) -> None:
        low = f"greater than {_num(self.low)}" if self.low_open else f"at least {_num(self.low)}"
        high = f"less than {_num(self.high)}" if self.high_open else f"at most {_num(self.high)}"
        why = f"; {self.why}" if self.why else ""
        raise RunSpecError(f"runspec '{name}': must be {low} and {high}{why} (got {shown(value)})")


# Why these limits: each is far beyond any real run and keeps the value meaningful where it is
# used (SQLite's integers are 64-bit; numpy's seeds are < 2**32; transformers reads a warmup of 1
# or more as a step count; AdamW multiplies the weights by 1 - lr x weight_decay each step, which
# stays positive with lr < 1 and weight_decay <= 1, where 10 and lr 0.5 would flip their sign).
BOUNDS = {
    "dataset_id": Bound(1, 2**63, high_open=True, why="a dataset's id"),
    "max_steps": Bound(0, 10_000_000, why="0 trains for 'epochs' instead"),
    "epochs": Bound(0, 10_000),
    "batch_size": Bound(1, 65_536),
    "grad_accum": Bound(1, 65_536),
    "learning_rate": Bound(0, 1, low_open=True, high_open=True),
    "warmup_ratio": Bound(0, 1, high_open=True, why="the share of the steps spent warming up"),
    "weight_decay": Bound(0, 1),
    "max_length": Bound(16, 1_000_000),
    "seed": Bound(0, 2**32, high_open=True, why="numpy's seeds are 32-bit"),
    "eval_steps": Bound(0, 10_000_000, why="0 evaluates only at the end"),
    "save_steps": Bound(0, 10_000_000, why="0 saves no checkpoints during training"),
    "exact_match_limit": Bound(0, 100_000, why="0 skips exact match"),
    "nproc_per_node": Bound(0, 64, why="worker processes on this machine; 0 picks one per visible GPU "
                            "(one on a CPU)"),
}


# Field annotations (strings: ``from __future__ import annotations``) -> accepted JSON types.
_FIELD_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,),
                "str | None": (str, type(None)), "int | None": (int, type(None)),
                "dict[str, Any]": (dict,)}
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               dict: "an object"}


class RunSpecError(ValueError):
    """A run specification that cannot be trained, with the field and the reason."""


@dataclass
class RunSpec:
    # what to train
    model: str = "default"
    method: str = "lora"
    method_settings: dict[str, Any] = field(default_factory=dict)
    dataset_id: int | None = None
    sample_task: str | None = None  # scored by exact match on its eval split when set
    # how long
    max_steps: int = 60  # > 0 wins over epochs
    epochs: float = 1.0
    # optimisation
    batch_size: int = 4
    grad_accum: int = 1
    learning_rate: float = 2e-4
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    # data
    max_length: int = 256
    loss_on: str = "assistant"
    packing: bool = False
    # compute
    precision: str = "auto"
    grad_checkpointing: bool = False
    # CUDA only, opt-in: liger-kernel's fused kernels and loss (studio/worker/kernels.py)
    liger_kernel: bool = False
    seed: int = 42
    # eval and checkpoints
    eval_steps: int = 20  # 0: evaluate only at the end
    save_steps: int = 20
    exact_match_limit: int = EXACT_MATCH_ROWS  # eval rows generated for exact match (0: skip)
    trust_remote_code: bool = False
    # processes (issue 18; studio/runs/multiprocess.py): 0 = one per visible GPU (1 on a CPU);
    # N > 1 starts the worker under torchrun (gloo on a CPU, its threads split between ranks)
    nproc_per_node: int = 0
    distributed: str = "ddp"  # DISTRIBUTED: how the processes share the model
    offload: bool = False  # FSDP / ZeRO parameters and optimizer state kept in CPU memory
    # experiment trackers the Trainer also logs to (studio/trackers/): "tensorboard", "mlflow";
    # a copy for the team's tools, the history stays the source of truth
    trackers: list[str] = field(default_factory=list)

    def validate(self) -> "RunSpec":
        """Check every field before a run row exists; a ``RunSpecError`` names the field, the
        value and what is accepted. Returns ``self``."""
        self._check_types()
        for name, bound in BOUNDS.items():
            bound.check(name, getattr(self, name))
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                self._refuse(name, f"must be one of {', '.join(choices)}")
        if not self.model.strip() or len(self.model) > MODEL_MAX_CHARS or "\0" in self.model:
            self._refuse("model", "must name a model (a hub id, a folder or a .gguf file, "
                         f"1 to {MODEL_MAX_CHARS:,} characters)")
        if self.dataset_id is None and self.sample_task is None:
            self._refuse("dataset_id", "choose a dataset (or a sample task)")
        if self.sample_task is not None:
            from studio.samples import SAMPLE_TASKS

            if self.sample_task not in SAMPLE_TASKS:
                self._refuse("sample_task", f"must be one of {', '.join(SAMPLE_TASKS)}")
        if self.distributed != "ddp" and self.nproc_per_node == 1:
            self._refuse("distributed", f"{self.distributed} shards the model across worker processes, "
                         "so it needs more than one: set nproc_per_node to 2 or more (or 0: one per GPU), "
                         "or use ddp")
        if self.offload and self.distributed == "ddp":
            self._refuse("offload", "offloading to the CPU is what fsdp, zero2 and zero3 do with the shards "
                         "they hold; ddp keeps a whole copy in every process: choose one of those, or "
                         "turn offload off")
        if self.max_steps == 0 and self.epochs == 0:
            self._refuse("max_steps", "give max_steps > 0 or epochs > 0 (both are 0)")
        try:
            spec = get_method(self.method)
        except SettingError as exc:
            raise RunSpecError(f"runspec 'method': {exc}") from None
        try:
            params = spec.params(self.method_settings)
        except SettingError as exc:
            raise RunSpecError(f"runspec 'method_settings': {exc}") from None
        refusal = spec.run_check(params, self, None) if spec.run_check else None
        if refusal:  # what the method cannot train with, whatever the device (GaLore's layer-wise)
            raise RunSpecError(refusal)
        if self.packing and not spec.packs_exactly:
            self._refuse("packing", f"{spec.title} puts virtual tokens before every sequence, so packed "
                         "examples would see each other: turn packing off for this method")
        from studio.trackers.choice import problem  # no tracker imported: find_spec only

        tracker_problem = problem(self.trackers)
        if tracker_problem:
            self._refuse("trackers", tracker_problem)
        return self

    def _refuse(self, name: str, why: str) -> None:
        raise RunSpecError(f"runspec '{name}': {why} (got {shown(getattr(self, name))})")

    def _check_types(self) -> None:
        """A value of the wrong JSON type (``"batch_size": "four"``, ``"packing": "yes"``) is named
        here instead of failing as a TypeError below or being taken as truthy by the worker."""
        for f in fields(self):
            expected = _FIELD_TYPES.get(str(f.type))
            if expected is None:  # a field type not listed above: not checked here
                continue
            value = getattr(self, f.name)
            if isinstance(value, HugeNumber) and f.name in BOUNDS:  # too long to read: too big
                BOUNDS[f.name].refuse(f.name, value)
            if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
                wanted = " or ".join("null" if t is type(None) else _TYPE_NAMES[t] for t in expected
                                     if not (t is int and float in expected))
                raise RunSpecError(f"runspec '{f.name}': must be {wanted} (got {shown(value)})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunSpec":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RunSpecError(f"unknown runspec field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: Path) -> "RunSpec":
        try:  # a number too long for Python stays a placeholder, refused by name in validate
            data = Decoder().decode(Path(path).read_text(encoding="utf-8-sig"))  # Notepad BOMs
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise RunSpecError(f"cannot read runspec {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise RunSpecError(f"{path}: a runspec is a JSON object")
        return cls.from_dict(data)


def _num(value: float) -> str:
    """A bound as people write it: 65,536 and 10,000,000, 0 and 1 (not 0.0)."""
    return f"{int(value):,}" if float(value).is_integer() else f"{value:g}"

