"""What every fine-tuning method declares: its hyperparameters, its closed-form trainable count,
how to apply it to a model, and the facts a user chooses by (family, merging, inference cost).

A method's ``Params`` is a dataclass whose fields carry ``metadata`` (help text, bounds, choices);
the Method tab turns those into widgets and the CLI parses ``--set key=value`` against them, so a
hyperparameter is declared once. Importing this module costs nothing: no torch, no peft.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from studio.arch import ArchInfo

ADDITIVE = "additive"
REPARAMETERISATION = "reparameterisation"
SELECTIVE = "selective"

NO_OVERHEAD = "none: merges into the weights"
EXTRA_MODULES = "extra sequential modules at every layer"
LONGER_CONTEXT = "longer context: virtual tokens in front of every prompt"
SCALES = "none once merged; otherwise one elementwise scale per adapted layer"


def param(default: Any, help: str, *, min: float | None = None, max: float | None = None,
          choices: tuple | None = None, step: float | None = None, advanced: bool = False) -> Any:
    """A hyperparameter field: its default plus what the UI needs to render and bound it."""
    meta = {"help": help, "min": min, "max": max, "choices": choices, "step": step,
            "advanced": advanced}
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Count:
    """A trainable-parameter count and the formula that produced it, numbers filled in."""

    trainable: int
    formula: str

    def __str__(self) -> str:
        return self.formula


@dataclass(frozen=True)
class MethodSpec:
    name: str
    title: str
    family: str
    mergeable: bool
    inference_overhead: str
    guidance: str  # when to use it, in one or two sentences
    params_cls: type
    count: Callable[[ArchInfo, Any], Count]
    apply: Callable[[Any, ArchInfo, Any], Any]  # (model, arch, params) -> trainable model
    quantized: bool = False  # the frozen base is loaded in 4-bit
    notes: str = ""
    # Sizes of the trainable tensors as (numel, how many): what an optimizer allocates state for.
    tensors: Callable[[ArchInfo, Any], list[tuple[int, int]]] | None = None

    def default_params(self) -> Any:
        return self.params_cls()

    def params(self, settings: dict[str, Any] | None = None) -> Any:
        """``Params`` from user settings (strings from the CLI, or typed values from the UI)."""
        return parse_params(self.params_cls, settings or {}, self.name)

    def fields(self) -> list[dataclasses.Field]:
        return list(dataclasses.fields(self.params_cls))


class SettingError(ValueError):
    """A hyperparameter the method does not have, or a value outside its bounds."""


def parse_params(cls: type, settings: dict[str, Any], method: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, raw in settings.items():
        if key not in known:
            raise SettingError(
                f"{method} has no setting '{key}'; its settings are: {', '.join(sorted(known))}"
            )
        values[key] = _coerce(known[key], raw, method)
    return cls(**values)


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _coerce(f: dataclasses.Field, raw: Any, method: str) -> Any:
    default = _default_of(f)
    meta = f.metadata
    try:
        if isinstance(default, bool):
            value = raw if isinstance(raw, bool) else str(raw).strip().lower() in ("1", "true", "yes", "on")
        elif isinstance(default, int):
            value = int(raw) if not isinstance(raw, float) or raw.is_integer() else _bad(raw)
        elif isinstance(default, float):
            value = float(raw)
        elif isinstance(default, (list, tuple)):
            items = raw if isinstance(raw, (list, tuple)) else [s for s in str(raw).split(",")]
            value = type(default)(s.strip() for s in items if str(s).strip())
        else:
            value = str(raw) if raw is not None else None
    except (TypeError, ValueError):
        raise SettingError(f"{method}: '{f.name}' expects {type(default).__name__}, got {raw!r}") from None
    if meta.get("choices") and value not in meta["choices"]:
        raise SettingError(f"{method}: '{f.name}' must be one of {list(meta['choices'])}, got {value!r}")
    if meta.get("min") is not None and value < meta["min"]:
        raise SettingError(f"{method}: '{f.name}' must be at least {meta['min']}, got {value}")
    if meta.get("max") is not None and value > meta["max"]:
        raise SettingError(f"{method}: '{f.name}' must be at most {meta['max']}, got {value}")
    return value


def _bad(raw: Any) -> Any:
    raise ValueError(raw)


def n(value: int | float) -> str:
    """A number as the formulas show it: thousands separated."""
    return f"{value:,}" if isinstance(value, int) else f"{value:,.4g}"


def per_module_sum(arch: ArchInfo, targets: list[str], term: Callable[[Any], int],
                   term_text: Callable[[Any], str], label: str) -> Count:
    """Σ over targeted Linear groups of count × term(group), written out group by group."""
    groups = arch.matching(targets)
    if not groups:
        raise SettingError(
            f"no module of this model matches {targets}; it has: {', '.join(arch.target_leaves)}"
        )
    return Count(sum(g.count * term(g) for g in groups),
                 grouped_formula(label, [(g.count, term_text(g)) for g in groups],
                                 sum(g.count * term(g) for g in groups)))


def grouped_formula(label: str, terms: list[tuple[int, str]], total: int) -> str:
    """``label = L × (t1 + t2 + …) = total`` when every term repeats L times, else a plain sum."""
    counts = {count for count, _ in terms}
    if len(counts) == 1:
        body = " + ".join(text for _, text in terms)
        return f"{label} = {counts.pop()} × ({body}) = {n(total)}"
    return f"{label} = {' + '.join(f'{c} × {t}' for c, t in terms)} = {n(total)}"


def resolve_targets(arch: ArchInfo, preset: str, custom: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Target names for a preset (attention, mlp, all-linear) or the user's own list.

    Names are the leaf (``q_proj``) unless two different modules share that leaf (GPT-2 has
    ``attn.c_proj`` and ``mlp.c_proj``): then the block-relative path, because PEFT matches
    ``target_modules`` by suffix and a bare leaf would pick both.
    """
    if custom:
        return list(custom)
    roles = {"attention": ("attention",), "mlp": ("mlp",)}.get(preset, ("attention", "mlp", "other"))
    paths_by_leaf: dict[str, set[str]] = {}
    for g in arch.block_linears:
        paths_by_leaf.setdefault(g.leaf, set()).add(g.path)
    names = [g.leaf if len(paths_by_leaf[g.leaf]) == 1 else g.path
             for g in arch.block_linears if g.role in roles]
    return list(dict.fromkeys(names))


def with_defaults(cls: type, name: str, **defaults: Any) -> type:
    """A subclass of the params dataclass ``cls`` with some field defaults changed."""
    if not defaults:
        return cls
    fields = [(f.name, f.type, field(default=defaults.get(f.name, _default_of(f)), metadata=f.metadata))
              for f in dataclasses.fields(cls)]
    return dataclasses.make_dataclass(name, fields, bases=(cls,), frozen=True)


def per_module_tensors(arch: ArchInfo, targets: list[str],
                       shapes: Callable[[Any], list[int]]) -> list[tuple[int, int]]:
    """(numel, count) for every trainable tensor an adapter adds to each targeted Linear."""
    return [(numel, g.count) for g in arch.matching(targets) for numel in shapes(g)]


def trainable_count(model: Any) -> int:
    """What a built model will actually train (parameters with requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
