"""Guess which layout a dataset uses (alpaca, messages, prompt_completion, text), how sure we
are, and why.

Detection looks at column names (case-insensitive, with the usual aliases) and at a sample of
values (is ``messages`` really a list of role/content dicts?). Every layout is scored, so the
Data tab can show the ranked candidates and let the user override the pick and the mapping.
The mapping goes from canonical slots (``instruction``, ``output``, ``messages``, ...) to the
file's column names.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

FORMATS = ("alpaca", "messages", "prompt_completion", "text")
KINDS = {"alpaca": "chat", "messages": "chat", "prompt_completion": "chat", "text": "text"}
ACCEPT = 0.5  # below this, or with a required slot missing, the format is "unknown"

# slot -> accepted column names, the canonical name first. Order matters: the first present
# alias is used.
SYSTEM = ("system", "system_prompt")
SLOTS: dict[str, dict[str, tuple[str, ...]]] = {
    "alpaca": {"instruction": ("instruction",), "input": ("input", "context"),
               "output": ("output", "response"), "system": SYSTEM},
    "messages": {"messages": ("messages", "conversations", "conversation"), "system": SYSTEM},
    "prompt_completion": {"prompt": ("prompt", "question", "query"),
                          "completion": ("completion", "answer", "response"),
                          "system": SYSTEM},
    "text": {"text": ("text", "content", "document", "body")},
}
REQUIRED = {"alpaca": ("instruction", "output"), "messages": ("messages",),
            "prompt_completion": ("prompt", "completion"), "text": ("text",)}
# What each required slot holds, for messages about a missing column.
SLOT_HELP = {"instruction": "the task or question", "output": "the answer to learn",
             "messages": "a list of {role, content} turns", "prompt": "the user's prompt",
             "completion": "the answer to learn", "text": "the text to learn from"}
# Words that hint at a column's role, for the suggested mapping of an unknown layout.
HINTS = {"user": ("question", "prompt", "query", "instruction", "input", "source", "request",
                  "user", "human", "problem"),
         "assistant": ("answer", "output", "response", "completion", "target", "reply",
                       "assistant", "solution", "label", "gpt"),
         "system": ("system",)}
PREFERENCE = {"alpaca": 0, "messages": 1, "prompt_completion": 2, "text": 3}


@dataclass
class Candidate:
    format: str
    confidence: float
    mapping: dict[str, str]
    missing: list[str] = field(default_factory=list)
    evidence: str = ""


@dataclass
class Detection:
    """The pick (``format`` may be "unknown"), its confidence 0..1, the slot -> column mapping
    (for "unknown": a suggested partial mapping with user/assistant/system keys), the evidence
    in words, and every layout's candidate, best first."""

    format: str
    confidence: float
    mapping: dict[str, str]
    evidence: str
    candidates: list[Candidate] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str | None:
        return KINDS.get(self.format)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def looks_like_turns(value: Any) -> str | None:
    """"openai" for a list of role/content dicts, "sharegpt" for from/value, else None."""
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        return None
    if all("role" in m and "content" in m for m in value):
        return "openai"
    if all("from" in m and "value" in m for m in value):
        return "sharegpt"
    return None


def _is_text(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _share(rows: list[dict], column: str, test) -> float:
    values = [row.get(column) for row in rows]
    return sum(1 for v in values if v is not None and test(v)) / len(values) if values else 0.0


def _find(columns: list[str], aliases: tuple[str, ...]) -> tuple[str | None, bool]:
    """The column matching the first alias present (case-insensitive), and whether it is the
    canonical name."""
    lower = {c.lower().strip(): c for c in reversed(columns)}
    for i, alias in enumerate(aliases):
        if alias in lower:
            return lower[alias], i == 0
    return None, False


def _score(fmt: str, columns: list[str], rows: list[dict]) -> Candidate:
    mapping: dict[str, str] = {}
    canonical = True
    for slot, aliases in SLOTS[fmt].items():
        column, exact = _find(columns, aliases)
        if column is not None and column not in mapping.values():
            mapping[slot] = column
            canonical = canonical and (exact or slot not in REQUIRED[fmt])
    missing = [slot for slot in REQUIRED[fmt] if slot not in mapping]
    if missing:
        found = len(REQUIRED[fmt]) - len(missing)
        names = ", ".join(f"{s!r}" for s in missing)
        return Candidate(fmt, round(0.3 * found / len(REQUIRED[fmt]), 2), mapping, missing,
                         f"no column for {names}")
    test = (lambda v: looks_like_turns(v) is not None) if fmt == "messages" else _is_text
    fit = min(_share(rows, mapping[slot], test) for slot in REQUIRED[fmt]) if rows else 1.0
    confidence = 0.6 + 0.3 * fit + (0.09 if canonical else 0.0)
    used = ", ".join(f"{s} <- {c!r}" for s, c in mapping.items())
    evidence = f"columns {used}; {fit:.0%} of sampled rows fit"
    if fmt == "messages" and rows:
        styles = {looks_like_turns(row.get(mapping["messages"])) for row in rows} - {None}
        if styles == {"sharegpt"}:
            evidence += " (ShareGPT style: from/value with human/gpt roles)"
    return Candidate(fmt, round(confidence, 2), mapping, [], evidence)


def detect(columns: list[str], rows: list[dict], *, source_kind: str | None = None) -> Detection:
    """Rank the layouts for a file with ``columns`` given a sample of its ``rows``."""
    columns = [c for c in columns if isinstance(c, str)]
    if source_kind == "text":
        cand = Candidate("text", 1.0, {"text": "text"}, [], "a plain-text file: each example is "
                         "one line or block of text (continued pre-training)")
        return Detection("text", 1.0, dict(cand.mapping), cand.evidence, [cand], ["text"])
    candidates = [_score(fmt, columns, rows) for fmt in FORMATS]
    _by_values(candidates, columns, rows)
    _adjust_text(candidates, columns, rows)
    candidates.sort(key=lambda c: (-c.confidence, PREFERENCE[c.format]))
    best = candidates[0]
    if not best.missing and best.confidence >= ACCEPT:
        return Detection(best.format, best.confidence, dict(best.mapping), best.evidence,
                         candidates, columns)
    near = next((c for c in candidates if c.mapping and c.format != "text"), None)
    listed = ", ".join(repr(c) for c in columns[:12]) or "none"
    evidence = f"no known layout fits the columns ({listed})"
    if near is not None:
        need = " or ".join(repr(a) for a in SLOTS[near.format][near.missing[0]]) \
            if near.missing else ""
        evidence += (f"; closest is {near.format}, which also needs a column {need} "
                     f"({SLOT_HELP[near.missing[0]]})" if near.missing else "")
    return Detection("unknown", 0.0, suggest_mapping(columns), evidence, candidates, columns)


def _by_values(candidates: list[Candidate], columns: list[str], rows: list[dict]) -> None:
    """A conversation column under an unusual name still counts as ``messages``."""
    msg = next(c for c in candidates if c.format == "messages")
    if not msg.missing or not rows:
        return
    for column in columns:
        share = _share(rows, column, lambda v: looks_like_turns(v) is not None)
        if share >= 0.8:
            msg.mapping = {"messages": column, **{k: v for k, v in msg.mapping.items()
                                                  if k == "system"}}
            msg.missing, msg.confidence = [], round(0.55 + 0.2 * share, 2)
            msg.evidence = f"column {column!r} holds lists of chat turns ({share:.0%} of rows)"
            return


def _adjust_text(candidates: list[Candidate], columns: list[str], rows: list[dict]) -> None:
    """Plain text only when the text column is the point of the file: an alpaca file with an
    extra pre-formatted ``text`` column is still alpaca."""
    text = next(c for c in candidates if c.format == "text")
    chat_ok = any(not c.missing and c.format != "text" for c in candidates)
    if not text.missing:
        others = [c for c in columns if c != text.mapping["text"]]
        if chat_ok:
            text.confidence = round(text.confidence * 0.5, 2)
        elif others:
            text.confidence = round(text.confidence - 0.15, 2)
            text.evidence += f"; other columns ignored: {', '.join(others[:6])}"
        return
    # A lone text column under another name is plain text, unless the file is a chat layout
    # with a column missing (then "unknown" and its message about the missing column is right).
    partial = any(c.format != "text" and set(REQUIRED[c.format]) & set(c.mapping)
                  for c in candidates)
    strings = [c for c in columns if rows and _share(rows, c, _is_text) >= 0.9]
    if len(strings) == 1 and not chat_ok and not partial:
        text.mapping, text.missing = {"text": strings[0]}, []
        text.confidence = 0.55
        text.evidence = f"{strings[0]!r} is the only text column: read as plain text"


def suggest_mapping(columns: list[str]) -> dict[str, str]:
    """A partial guess (user/assistant/system -> column) from words in the column names."""
    out: dict[str, str] = {}
    for slot, words in HINTS.items():
        for column in columns:
            name = column.lower()
            if column not in out.values() and any(w in name for w in words):
                out[slot] = column
                break
    return out
