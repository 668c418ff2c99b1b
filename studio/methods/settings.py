"""A method's settings from what a user typed: ``parse_params`` turns CLI text (``--set r=8``) or
the UI's typed values into the method's ``Params`` dataclass, each value coerced to its field's
type and kept inside the field's bounds, or a ``SettingError`` naming the method, the setting,
the value and what is accepted. No torch, no peft.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any


class SettingError(ValueError):
    """A hyperparameter the method does not have, or a value outside its bounds."""


ALL_LINEAR = "all-linear"  # PEFT's keyword for "every Linear but the output layer"
NAMES_MAX = 256  # module names in one list: a real model has a few dozen kinds at most
NAME_MAX_CHARS = 200
TEXT_MAX_CHARS = 10_000  # a free-text setting (prompt tuning's init text) is a sentence or two
_MODULE_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_params(cls: type, settings: dict[str, Any], method: str) -> Any:
    if not isinstance(settings, dict):
        raise SettingError(f"{method}: settings must be an object of name: value, got "
                           f"{shown(settings)}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, raw in settings.items():
        if key not in known:
            raise SettingError(
                f"{method} has no setting '{key}'; its settings are: {', '.join(sorted(known))}"
            )
        values[key] = _coerce(known[key], raw, method)
    _all_linear(values, known, method)
    return cls(**values)


def _all_linear(values: dict[str, Any], known: dict[str, dataclasses.Field], method: str) -> None:
    """``target_modules: "all-linear"`` is PEFT's keyword, not a module name: as our list it would
    match no module. Alone, and where the method has presets, it means the all-linear preset
    (every Linear in the blocks, as PEFT's keyword does); anywhere else it is refused here."""
    for key, value in list(values.items()):
        if not isinstance(value, tuple) or ALL_LINEAR not in value:
            continue
        if key == "target_modules" and value == (ALL_LINEAR,) and "target_preset" in known:
            values["target_preset"], values[key] = ALL_LINEAR, ()
            continue
        hint = ("set target_preset to 'all-linear' and leave target_modules empty"
                if "target_preset" in known else
                "leave it empty for the method's default targets, or list module names")
        raise SettingError(f"{method}: '{key}' lists 'all-linear', which is not a module name; "
                           f"{hint} (got {shown(','.join(value))})")


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _coerce(f: dataclasses.Field, raw: Any, method: str) -> Any:
    """``raw`` (CLI text or a typed value) as the field's type, inside its bounds; a
    ``SettingError`` naming the method, the setting, the value and what is accepted."""
    default = default_of(f)
    meta = f.metadata
    name = f"{method}: '{f.name}'"
    if isinstance(default, bool):
        word = str(raw).strip().lower() if isinstance(raw, (str, int)) else None
        if isinstance(raw, bool) or word in _TRUE + _FALSE:
            return raw if isinstance(raw, bool) else word in _TRUE
        raise SettingError(f"{name} expects true or false, got {shown(raw)}")
    if isinstance(default, (int, float)):
        return _number(f, raw, default, name)
    if isinstance(default, (list, tuple)):
        return type(default)(_names(raw, name))
    if raw is None:
        value = None
    elif not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
        raise SettingError(f"{name} expects text, got {shown(raw)}")
    else:
        value = str(raw)
        if len(value) > TEXT_MAX_CHARS:
            raise SettingError(f"{name} must be at most {TEXT_MAX_CHARS:,} characters, got "
                               f"{len(value):,}")
    if meta.get("choices") and value not in meta["choices"]:
        raise SettingError(f"{name} must be one of {list(meta['choices'])}, got {shown(value)}")
    return value


def _number(f: dataclasses.Field, raw: Any, default: int | float, name: str) -> int | float:
    """An int or float setting: finite, whole for an int, within the field's min and max."""
    kind = type(default).__name__
    try:
        if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
            raise TypeError(raw)
        if isinstance(default, int):
            if isinstance(raw, float) and not raw.is_integer():  # also NaN and infinities
                raise ValueError(raw)
            value: int | float = int(raw)  # "9" * 5000 from the CLI: a ValueError too
        else:
            value = float(raw)
    except (TypeError, ValueError, OverflowError):
        raise SettingError(f"{name} expects {kind}, got {shown(raw)}") from None
    low, high = f.metadata.get("min"), f.metadata.get("max")
    if isinstance(value, float) and not math.isfinite(value):
        raise SettingError(f"{name} must be a finite number{_range(low, high)}, got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise SettingError(f"{name} must be{_range(low, high)}, got {shown(value)}")
    return value


def _range(low: float | None, high: float | None) -> str:
    parts = ([f"at least {low}"] if low is not None else []) + \
            ([f"at most {high}"] if high is not None else [])
    return " " + " and ".join(parts) if parts else ""


def _names(raw: Any, name: str) -> list[str]:
    """Module names from "q_proj, v_proj" or a list of strings; each a dotted identifier."""
    if isinstance(raw, str):
        items = raw.split(",")
    elif isinstance(raw, (list, tuple)) and all(isinstance(s, str) for s in raw):
        items = list(raw)
    else:
        raise SettingError(f"{name} expects module names (a list of strings or "
                           f"'q_proj,v_proj'), got {shown(raw)}")
    names = [s.strip() for s in items if s.strip()]
    if len(names) > NAMES_MAX:
        raise SettingError(f"{name} takes at most {NAMES_MAX} module names, got {len(names):,}")
    for item in names:
        if item != ALL_LINEAR and (len(item) > NAME_MAX_CHARS or
                                   not _MODULE_NAME.fullmatch(item)):
            raise SettingError(f"{name}: {shown(item)} is not a module name (letters, digits "
                               f"and _, parts joined by dots, e.g. q_proj or mlp.down_proj; "
                               f"at most {NAME_MAX_CHARS} characters)")
    return names


def shown(value: Any) -> str:
    """A value for a message, cut short (a pasted file must not fill the screen)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"a number of about {int(value.bit_length() * math.log10(2)) + 1:,} digits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
