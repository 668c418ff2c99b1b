"""``RunSpec``: everything a training run needs, as one JSON-able dataclass.

The only contract between the UI, the CLI and the worker: the UI (or ``peft-studio train
runspec.json``) writes it into the run's row and folder; the worker reads nothing else. Saved as
``projects/<project>/runs/<run>/runspec.json`` so a run can be repeated from the command line.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LOSS_ON = ("assistant", "all")


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
    seed: int = 42
    # eval and checkpoints
    eval_steps: int = 20  # 0: evaluate only at the end
    save_steps: int = 20
    exact_match_limit: int = 50  # eval rows generated for exact match (0: skip)
    trust_remote_code: bool = False

    def validate(self) -> "RunSpec":
        from studio.methods import get_method

        self._check_types()
        spec = get_method(self.method)  # raises SettingError (a ValueError) for unknown names
        spec.params(self.method_settings)
        checks = [
            (self.dataset_id is not None or self.sample_task is not None, "dataset_id",
             "choose a dataset (or a sample task)"),
            (self.max_steps > 0 or self.epochs > 0, "max_steps", "give max_steps > 0 or epochs > 0"),
            (self.batch_size >= 1, "batch_size", "must be at least 1"),
            (self.grad_accum >= 1, "grad_accum", "must be at least 1"),
            (0 < self.learning_rate < 1, "learning_rate", "must be between 0 and 1"),
            (self.lr_scheduler in SCHEDULES, "lr_scheduler", f"must be one of {SCHEDULES}"),
            (self.precision in PRECISIONS, "precision", f"must be one of {PRECISIONS}"),
            (self.loss_on in LOSS_ON, "loss_on", f"must be one of {LOSS_ON}"),
            (16 <= self.max_length <= 1_000_000, "max_length", "must be between 16 and 1,000,000"),
            (self.eval_steps >= 0 and self.save_steps >= 0, "eval_steps", "must not be negative"),
            (self.optimizer in ("adamw", "adamw8bit", "sgd"), "optimizer", "adamw, adamw8bit or sgd"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise RunSpecError(f"runspec '{name}': {why} (got {getattr(self, name)!r})")
        return self

    def _check_types(self) -> None:
        """A value of the wrong JSON type (``"batch_size": "four"``, ``"packing": "yes"``) is named
        here instead of failing as a TypeError below or being taken as truthy by the worker."""
        for f in fields(self):
            expected = _FIELD_TYPES.get(str(f.type))
            if expected is None:  # a field type not listed above: not checked here
                continue
            value = getattr(self, f.name)
            if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
                wanted = " or ".join("null" if t is type(None) else _TYPE_NAMES[t] for t in expected
                                     if not (t is int and float in expected))
                raise RunSpecError(f"runspec '{f.name}': must be {wanted} (got {value!r})")

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
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise RunSpecError(f"cannot read runspec {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise RunSpecError(f"{path}: a runspec is a JSON object")
        return cls.from_dict(data)
