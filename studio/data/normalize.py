"""Turn one mapped row into the canonical example, or say exactly what is wrong with it.

The canonical format is the contract with the rest of the studio::

    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}   # kind "chat"
    {"text": str}                                                               # kind "text"

A system message is optional and only first; a chat example has at least one user and one
assistant turn and ends with an assistant turn (the part the model learns). Content is kept
verbatim (no stripping): whitespace can be what the user wants to teach. An Alpaca row's user
message is ``studio.samples.prompt_text`` (instruction, blank line, input), the same text the
sample tasks are trained and scored with, so the two never drift apart.

Type rule: numbers and booleans where text is expected are turned into text (``5`` -> ``"5"``)
with a warning, because exported sheets often store short answers as numbers; lists and objects
where text is expected are errors.

This module also settles which format and mapping an import uses (``resolve``).
"""

from __future__ import annotations

import math
from typing import Any

from studio.samples import prompt_text

from .detect import FORMATS, REQUIRED, SLOT_HELP, SLOTS, Detection
from .errors import FormatError
from .jsonfile import type_name
from .jsonnum import Decoder

ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
         "gpt": "assistant", "bot": "assistant", "model": "assistant"}
ROLES_HELP = "valid roles: system, user, assistant; ShareGPT's human and gpt are accepted too"
GENERIC = {"prompt_completion": {"user": "prompt", "assistant": "completion"},
           "alpaca": {"user": "instruction", "assistant": "output"}}

Issue = tuple[str, str | None, str]  # (code, field, message)


def resolve(detection: Detection, fmt: str | None, mapping: dict[str, str] | None,
            file: str) -> tuple[str, dict[str, str]]:
    """The format and slot -> column mapping to import with: the user's override if given
    (checked against the file's columns), else the detection's pick."""
    columns = detection.columns
    have = ", ".join(repr(c) for c in columns[:20]) or "none"
    if fmt is None and mapping:
        fmt = _format_for(mapping)
    fmt = fmt or detection.format
    if fmt == "unknown":
        raise FormatError(f"could not recognise the layout: {detection.evidence}. Choose a "
                          "format (alpaca, messages, prompt_completion, text) and map the "
                          "columns, e.g. {'user': 'question_col', 'assistant': 'answer_col'}",
                          file=file, code="unknown_format")
    if fmt not in FORMATS:
        raise FormatError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}",
                          file=file, code="unknown_format")
    if mapping is None:
        cand = next(c for c in detection.candidates if c.format == fmt)
        for slot in REQUIRED[fmt]:
            if slot not in cand.mapping:
                first, *others = SLOTS[fmt][slot]
                names = repr(first) + (f" (or {', '.join(map(repr, others))})" if others else "")
                raise FormatError(f"format {fmt!r} needs a column {names} holding "
                                  f"{SLOT_HELP[slot]}; the file has columns: {have}",
                                  file=file, field=SLOTS[fmt][slot][0], code="missing_column")
        return fmt, dict(cand.mapping)
    out: dict[str, str] = {}
    for key, column in mapping.items():
        slot = GENERIC.get(fmt, {}).get(key, key)
        if slot not in SLOTS[fmt]:
            raise FormatError(f"mapping key {key!r} is not used by format {fmt!r} (it uses "
                              f"{', '.join(SLOTS[fmt])})", file=file, code="bad_mapping")
        if not isinstance(column, str) or (columns and column not in columns):
            raise FormatError(f"mapping {key!r} -> {column!r}: no such column; the file has "
                              f"columns: {have}", file=file, code="bad_mapping")
        out[slot] = column
    for slot in REQUIRED[fmt]:
        if slot not in out:
            raise FormatError(f"the mapping for format {fmt!r} needs {slot!r} "
                              f"({SLOT_HELP[slot]})", file=file, code="bad_mapping")
    return fmt, out


def _format_for(mapping: dict[str, str]) -> str:
    if "messages" in mapping:
        return "messages"
    if "instruction" in mapping or "output" in mapping:
        return "alpaca"
    if set(mapping) == {"text"}:
        return "text"
    return "prompt_completion"


def convert_row(row: dict, fmt: str, mapping: dict[str, str]
                ) -> tuple[dict | None, list[Issue], list[Issue]]:
    """(canonical example or None, errors, warnings) for one row."""
    errors: list[Issue] = []
    warnings: list[Issue] = []

    def text(slot: str, required: bool = True) -> str:
        column = mapping.get(slot)
        if column is None:
            return ""
        value = _as_text(row, column, required, errors, warnings)
        return value or ""

    if fmt == "text":
        value = text("text")
        return (None if errors else {"text": value}), errors, warnings
    system = text("system", required=False)
    if fmt == "messages":
        messages = _turns(row, mapping["messages"], errors, warnings)
        if messages is not None and system.strip() and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
    else:
        if fmt == "alpaca":
            instruction, extra = text("instruction"), text("input", required=False)
            user = prompt_text({"instruction": instruction, "input": extra}) if instruction \
                else ""
            answer = text("output")
        else:
            user, answer = text("prompt"), text("completion")
        messages = [{"role": "system", "content": system}] if system.strip() else []
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    if errors or messages is None:
        return None, errors, warnings
    return {"messages": messages}, errors, warnings


def _as_text(row: dict, column: str, required: bool, errors: list[Issue],
             warnings: list[Issue], label: str = "") -> str | None:
    """The value of ``row[column]`` as text, or None with the problem recorded."""
    if column not in row:
        if required:
            errors.append(("missing_field", column, f"{label}missing (expected non-empty text)"))
        return None
    return _text_value(row[column], column, required, errors, warnings, label)


def _text_value(value: Any, column: str, required: bool, errors: list[Issue],
                warnings: list[Issue], label: str = "") -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        if required:
            shown = "null" if value is None else "NaN"
            errors.append(("missing_value", column, f"{label}no value ({shown}; expected "
                           "non-empty text)"))
        return None
    if isinstance(value, bool):
        value = "true" if value else "false"
        warnings.append(("coerced", column, f"{label}true/false used as text {value!r}"))
    elif isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            errors.append(("wrong_type", column, f"{label}wrong type: expected text, found "
                           f"the number {value}"))
            return None
        warnings.append(("coerced", column, f"{label}number {value!r} used as text"))
        value = str(value)
    elif not isinstance(value, str):
        errors.append(("wrong_type", column, f"{label}wrong type: expected text, found "
                       f"{type_name(value)}"))
        return None
    if not value.strip():
        if required:
            errors.append(("empty_value", column, f"{label}empty value (expected non-empty "
                           "text)"))
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # "\ud800" escapes in JSON decode to text Arrow can't store
        errors.append(("bad_text", column, f"{label}contains an invalid character (an "
                       "unpaired surrogate such as \\ud800)"))
        return None
    return value


def _turns(row: dict, column: str, errors: list[Issue], warnings: list[Issue]
           ) -> list[dict] | None:
    """The conversation in ``row[column]`` as canonical turns; None (errors recorded) if it
    is not a usable conversation. Stops at the first problem: one clear reason per row."""
    value = row.get(column)
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:  # CSV files carry conversations as JSON text (a too-long number: a wrong type)
            value = Decoder().decode(value)
        except (ValueError, RecursionError):
            pass
    if column not in row or value is None:
        errors.append(("missing_field", column, "missing (expected a list of messages)"))
        return None
    if not isinstance(value, list):
        errors.append(("wrong_type", column, "wrong type: expected a list of messages "
                       f"({{role, content}}), found {type_name(value)}"))
        return None
    turns: list[dict] = []
    for i, message in enumerate(value, 1):
        problem = _turn(message, i, column, turns, errors, warnings)
        if problem:
            errors.append(problem)
            return None
    roles = [t["role"] for t in turns]
    if not turns:
        problem = ("empty_conversation", column, "empty conversation (no messages)")
    elif "user" not in roles:
        problem = ("no_user", column, "the conversation has no user turn")
    elif "assistant" not in roles:
        problem = ("no_assistant", column, "the conversation has no assistant turn (nothing "
                   "to learn)")
    elif roles[-1] != "assistant":
        problem = ("last_not_assistant", column, f"the conversation ends with a {roles[-1]} "
                   "turn; it must end with an assistant turn (the answer to learn)")
    else:
        return turns
    errors.append(problem)
    return None


def _turn(message: Any, i: int, column: str, turns: list[dict], errors: list[Issue],
          warnings: list[Issue]) -> Issue | None:
    """Append message ``i`` to ``turns``; the problem if it is not a valid turn."""
    if not isinstance(message, dict):
        return ("wrong_type", column, f"message {i} is {type_name(message)} (expected an "
                "object with role and content)")
    raw_role = message.get("role", message.get("from"))
    if raw_role is None:
        return ("missing_role", column, f"message {i} has no role (a 'role' or 'from' key)")
    role = ROLES.get(raw_role.strip().lower()) if isinstance(raw_role, str) else None
    if role is None:
        shown = raw_role if isinstance(raw_role, str) else type_name(raw_role)
        return ("unknown_role", column, f"unknown role {shown!r} in message {i} "
                f"({ROLES_HELP})")
    content = message.get("content", message.get("value"))
    if isinstance(content, list) and content and all(
            isinstance(p, dict) and p.get("type") == "text" for p in content):
        content = "".join(str(p.get("text", "")) for p in content)  # OpenAI text parts
    before = len(errors)
    text = _text_value(content, column, role != "system", errors, warnings,
                       label=f"message {i} ({role}): ")
    if len(errors) > before:
        return errors.pop()
    if role == "system":
        if turns:
            return ("system_position", column, f"message {i}: a system message must come "
                    "first")
        if text is None:
            return None  # an empty system prompt is common in exports and means "none"
    turns.append({"role": role, "content": text})
    return None


def length_text(example: dict) -> str:
    """The text whose length is checked against ``max_tokens``."""
    if "text" in example:
        return example["text"]
    return "\n".join(m["content"] for m in example["messages"])
