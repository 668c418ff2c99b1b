"""A Hugging Face chat template translated into Ollama's TEMPLATE (Go ``text/template``).

Translating arbitrary Jinja is not feasible, so we measure the template instead of reading it.
It is rendered (``apply_chat_template``, ``tokenize=False``) for a few conversations whose
contents are unique sentinel strings; the text *between* two contents is the "gap" the template
writes between a message of role ``prev`` and the next one of role ``role``. A template is
expressible when every render is exactly::

    gap(start, r1) + c1 + gap(r1, r2) + c2 + ... + cn + gap(rn, generation prompt)

with gaps that depend only on the two neighbouring roles. That covers per-role headers and
end-of-turn markers (ChatML, Llama 3, Phi-3), a BOS written once, a system prompt folded into
the first user turn (Llama 2's ``<<SYS>>``, Gemma 3) and a built-in default system prompt
(SmolLM2, Qwen2: see ``default_system``). It is checked by re-rendering every measured
conversation from the gaps (``render``) and comparing with Hugging Face's output; a template
that fails (one that folds the system prompt into the *last* user turn, reorders, or writes a
message's content twice) raises ``TemplateNotExpressible`` with what differed, and the
Modelfile is written without a TEMPLATE rather than with a wrong one.

A template that raises on a system message (Mistral v0.1, Gemma 2) or silently drops it is
translated for user and assistant turns only (``Pieces.system`` is False): system messages are
left out, as Hugging Face cannot render them either.

The Go template tracks the previous role in ``$prev`` and writes each gap as a quoted Go string
(so no whitespace trimming or ``{{`` in a template can change it). After a final user message it
writes the generation prompt; after a final assistant message nothing, which is Ollama's
convention for continuing a partial answer.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

START, GEN = "", "gen"  # the "previous role" before the first message; the generation prompt
ROLES = ("system", "user", "assistant")
_SENTINEL = {"system": "QxSYSTEMx{}Qx", "user": "QxUSERx{}Qx", "assistant": "QxASSISTANTx{}Qx"}

Render = Callable[[list[dict[str, str]], bool], str]  # (messages, add_generation_prompt) -> text


class TemplateNotExpressible(Exception):
    """The chat template cannot be written as an Ollama TEMPLATE of per-role-pair gaps: ``str()``
    is the reason in words, ``detail`` what was rendered (for the log, not the Modelfile)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.detail = detail


@dataclass
class Pieces:
    """The measured template: ``gaps[(prev, role)]`` (prev "" = start, role "gen" = the
    generation prompt), whether a system role exists, and the built-in default system prompt."""

    gaps: dict[tuple[str, str], str]
    system: bool = True
    default_system: str | None = None
    bos_removed: str = ""  # the BOS text left out because the tokenizer (and llama.cpp) adds it
    notes: list[str] = field(default_factory=list)


def conversations(system: bool) -> list[list[dict[str, str]]]:
    """The sentinel conversations measured and checked: one and three turns, with and without
    a system message (each rendered with the generation prompt)."""
    def turns(n: int, with_system: bool) -> list[dict[str, str]]:
        chat = [{"role": "system", "content": _SENTINEL["system"].format(0)}] if with_system else []
        for i in range(n):
            chat.append({"role": "user", "content": _SENTINEL["user"].format(i)})
            if i < n - 1:
                chat.append({"role": "assistant", "content": _SENTINEL["assistant"].format(i)})
        return chat
    chats = [turns(1, False), turns(3, False)]
    return chats + [turns(1, True), turns(3, True)] if system else chats


def _gaps_of(text: str, chat: list[dict[str, str]]) -> list[str]:
    """The texts before, between and after the contents of ``chat`` in ``text``, in order."""
    gaps, at = [], 0
    for message in chat:
        found = text.find(message["content"], at)
        if found < 0:
            raise TemplateNotExpressible(
                f"the template moves, repeats or changes a {message['role']} message's text depending "
                "on the conversation (a system prompt placed in the last user turn, for one)", repr(text))
        gaps.append(text[at:found])
        at = found + len(message["content"])
    return gaps + [text[at:]]


def _record(gaps: dict, key: tuple[str, str], value: str, chat: list) -> None:
    if gaps.setdefault(key, value) != value:
        raise TemplateNotExpressible(
            f"the text the template writes before a {key[1]} message depends on more than the role "
            f"before it", f"{gaps[key]!r} in one conversation, {value!r} in {[m['role'] for m in chat]}")


def measure(render: Render) -> Pieces:
    """Measure ``render`` (Hugging Face's template) into ``Pieces``, checked by re-rendering."""
    system = True
    try:
        probe = render(conversations(True)[2], True)
        if _SENTINEL["system"].format(0) not in probe:
            system = False  # the template drops system messages
    except Exception:  # noqa: BLE001 - jinja's raise_exception: the template refuses a system role
        system = False
    gaps: dict[tuple[str, str], str] = {}
    chats = conversations(system)
    rendered = []
    for chat in chats:
        try:
            text = render(chat, True)
        except Exception as exc:  # noqa: BLE001 - any template error is a reason not to translate
            raise TemplateNotExpressible("the chat template fails on a plain user/assistant conversation",
                                         str(exc)) from exc
        rendered.append(text)
        roles = [START] + [m["role"] for m in chat] + [GEN]
        for (prev, role), gap in zip(zip(roles, roles[1:]), _gaps_of(text, chat)):
            _record(gaps, (prev, role), gap, chat)
    pieces = Pieces(gaps=gaps, system=system)
    if not system:
        pieces.notes.append("the chat template has no system role (it refuses or drops system "
                            "messages): system messages are left out")
    for chat, text in zip(chats, rendered):  # the gaps must give back every measured render
        mine = render_pieces(pieces, chat)
        if mine != text:
            raise TemplateNotExpressible("the template's prompt cannot be rebuilt from per-role pieces",
                                         f"rebuilt {mine!r}, Hugging Face's template gives {text!r}")
    pieces.default_system = default_system(pieces)
    return pieces


def default_system(pieces: Pieces) -> str | None:
    """The system prompt the template writes when a conversation has none (SmolLM2, Qwen2), or
    None: found when the start of a system-less conversation equals a system message's render."""
    if not pieces.system:
        return None
    plain, head, tail = (pieces.gaps[(START, "user")], pieces.gaps[(START, "system")],
                         pieces.gaps[("system", "user")])
    if len(plain) > len(head) + len(tail) and plain.startswith(head) and plain.endswith(tail):
        return plain[len(head):len(plain) - len(tail)]
    return None


def strip_bos(pieces: Pieces, bos: str | None) -> None:
    """Leave the BOS text out of the start gaps: llama.cpp adds BOS itself when the GGUF says
    so (the tokenizer's own behaviour), and a template writing it too would give two."""
    starts = [key for key in pieces.gaps if key[0] == START]
    if bos and starts and all(pieces.gaps[key].startswith(bos) for key in starts):
        for key in starts:
            pieces.gaps[key] = pieces.gaps[key][len(bos):]
        pieces.bos_removed = bos


def render_pieces(pieces: Pieces, chat: Sequence[dict[str, str]]) -> str:
    """The prompt the pieces give for ``chat`` (what the Go template does, in Python)."""
    out, prev = [], START
    for message in chat:
        role = message["role"]
        if role not in ROLES or (role == "system" and not pieces.system):
            continue
        out += [pieces.gaps.get((prev, role), ""), message["content"]]
        prev = role
    if prev != "assistant":
        out.append(pieces.gaps.get((prev, GEN), ""))
    return pieces.bos_removed + "".join(out)


def printable(ch: str) -> bool:
    """Go's ``strconv.IsPrint``: what Ollama's Modelfile parser keeps (it drops other characters)."""
    return ch == " " or unicodedata.category(ch)[0] in "LMNPS"


def go_string(text: str) -> str:
    """``text`` as a Go interpreted string literal: JSON's escapes (valid in Go) for quotes,
    backslashes and control characters, ``\\uXXXX`` / ``\\UXXXXXXXX`` for any other character
    Ollama's parser would drop (a no-break space, a zero-width joiner); the rest literal."""
    body = json.dumps(text, ensure_ascii=False)[1:-1]
    return '"' + "".join(ch if printable(ch) or ch == "\\" else
                         f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}"
                         for ch in body) + '"'


def _branches(options: list[tuple[str, str]]) -> str:
    """``{{ if eq $prev "a" }}{{ "gap" }}{{ else if ... }}{{ end }}`` for the non-empty gaps;
    previous roles sharing a gap share a branch (``or``), which keeps the TEMPLATE readable."""
    grouped: dict[str, list[str]] = {}
    for prev, gap in options:
        if gap:
            grouped.setdefault(gap, []).append(prev)
    parts = []
    for i, (gap, prevs) in enumerate(grouped.items()):
        tests = [f"eq $prev {go_string(prev)}" for prev in prevs]
        test = tests[0] if len(tests) == 1 else "or " + " ".join(f"({t})" for t in tests)
        parts.append(f'{{{{ {"if" if i == 0 else "else if"} {test} }}}}{{{{ {go_string(gap)} }}}}')
    return "".join(parts) + "{{ end }}" if parts else ""


def go_template(pieces: Pieces) -> str:
    """The Ollama TEMPLATE for ``pieces``: a loop over ``.Messages`` writing each gap chosen by the
    previous role (``$prev``), the message's ``.Content``, and the generation prompt at the end."""
    roles = [r for r in ROLES if r != "system" or pieces.system]
    lines = ['{{- $prev := "" }}', "{{- range .Messages }}"]
    for i, role in enumerate(roles):
        befores = [(prev, gap) for (prev, r), gap in sorted(pieces.gaps.items()) if r == role]
        lines.append(f'{{{{- {"if" if i == 0 else "else if"} eq .Role {go_string(role)} }}}}'
                     f'{_branches(befores)}{{{{ .Content }}}}{{{{ $prev = .Role }}}}')
    lines += ["{{- end }}", "{{- end }}"]
    ends = [(prev, gap) for (prev, r), gap in sorted(pieces.gaps.items()) if r == GEN and prev != "assistant"]
    if _branches(ends):
        lines.append("{{- " + _branches(ends)[3:])  # "{{ if" -> "{{- if": trims the newline before it
    text = "\n".join(lines)
    if '"""' in text or not all(printable(ch) or ch == "\n" for ch in text):  # go_string prevents both
        raise TemplateNotExpressible("the translated template would not survive the Modelfile's quoting")
    return text
