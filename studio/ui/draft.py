"""The run draft of one browser session: the RunSpec the Method and Train tabs put together, plus
what only the Method tab's estimate needs (the model it plans for, a base quantisation, the GPU
memory the user plans for).

The app keeps one draft per session in one ``gr.State``; both tabs are views of it: a user's edit
replaces the draft (``with_*``), and a tab redraws its widgets from the draft when it is opened
and after a History clone. So one method choice and one set of training settings exist, and no
change event of one tab can undo what another wrote. A frozen value without gradio or torch, so
handlers and tests edit it directly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from studio import config
from studio.methods import get_method
from studio.runspec import RunSpec
from studio.ui import data_choice

# RunSpec fields the tabs have widgets for (Train: all but the optimizer; Method: the setup ones).
TRAINING_FIELDS = ("max_steps", "epochs", "batch_size", "grad_accum", "learning_rate", "lr_scheduler",
                   "max_length", "packing", "grad_checkpointing", "precision", "liger_kernel", "optimizer", "seed",
                   "eval_steps", "exact_match_limit", "nproc_per_node")
QUANTS = ("none", "nf4", "int8")


def _new_spec() -> RunSpec:
    return RunSpec(sample_task=data_choice.decode(data_choice.DEFAULT).sample_task)


@dataclass(frozen=True)
class RunDraft:
    spec: RunSpec = field(default_factory=_new_spec)
    model: str = config.DEFAULT_MODEL  # what the Method tab estimates for (the project's model)
    quant: str = "none"  # the Method tab's base quantisation (QLoRA always NF4)
    gpu_gib: float | None = None  # GPU memory the Method tab plans for; None: no GPU figure

    def _spec(self, **changes: Any) -> "RunDraft":
        changes.setdefault("method_settings", dict(self.spec.method_settings))  # never shared
        spec = dataclasses.replace(self.spec, **changes)
        return dataclasses.replace(self, spec=spec)

    @property
    def data(self) -> str | None:
        """The data choice as the dropdowns spell it."""
        return data_choice.encode(self.spec.sample_task, self.spec.dataset_id)

    def with_data(self, value: str | None) -> "RunDraft":
        choice = data_choice.decode(value)  # ValueError names a malformed value
        return self._spec(sample_task=choice.sample_task, dataset_id=choice.dataset_id)

    def with_method(self, name: str) -> "RunDraft":
        """Another method, at its default settings (another method's settings do not carry over)."""
        if name == self.spec.method:
            return self
        get_method(name)  # SettingError (a ValueError) for an unknown name
        return self._spec(method=name, method_settings={})

    def with_setting(self, name: str, raw: Any) -> "RunDraft":
        """One method setting as the widget gives it; None (a cleared field) drops it: the
        method's default applies. Checked when the estimate or the run reads it."""
        settings = dict(self.spec.method_settings)
        if raw is None or raw == "":
            settings.pop(name, None)
        else:
            settings[name] = list(raw) if isinstance(raw, tuple) else raw
        return self._spec(method_settings=settings)

    def with_field(self, name: str, raw: Any) -> "RunDraft":
        """One training setting (a RunSpec field) as its widget gives it, cast to the field's
        type. A cleared number keeps the previous value; bounds are checked at Start."""
        if name not in TRAINING_FIELDS:
            raise ValueError(f"not a training setting: {name!r}")
        if raw is None or raw == "":
            return self
        kind = type(getattr(RunSpec(), name))
        value = bool(raw) if kind is bool else kind(raw) if kind in (int, float) else str(raw)
        if kind is int and float(raw) != value:
            raise ValueError(f"{name} must be a whole number (got {raw})")
        return self._spec(**{name: value})

    def with_plan(self, model: str | None = None, quant: str | None = None,
                  gpu_gib: float | None | str = "keep") -> "RunDraft":
        """The Method tab's planning figures (not training settings)."""
        changes: dict[str, Any] = {}
        if model is not None:
            changes["model"] = model.strip() or config.DEFAULT_MODEL
        if quant is not None:
            if quant not in QUANTS:
                raise ValueError(f"quantisation must be one of {', '.join(QUANTS)} (got {quant!r})")
            changes["quant"] = quant
        if gpu_gib != "keep":
            changes["gpu_gib"] = float(gpu_gib) if gpu_gib else None
        return dataclasses.replace(self, **changes)

    def with_spec(self, spec: RunSpec) -> "RunDraft":
        """A whole RunSpec (History's clone): every field, including those no widget shows."""
        copy = RunSpec.from_dict(spec.to_dict())
        return dataclasses.replace(self, spec=copy)

    def run_spec(self, model: str) -> RunSpec:
        """The RunSpec a run on ``model`` (the project's model) starts from, validated:
        ``RunSpecError`` names the field and the value."""
        return self._spec(model=model).spec.validate()
