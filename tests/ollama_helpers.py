"""What Ollama does with a Modelfile and a chat request, for the tests, written from Ollama's
documented behaviour and its parser's rules (not from the studio's code):

* ``read_modelfile``: Ollama's Modelfile reading, character by character — an instruction name,
  a space, then a value that ends at the first newline where the value so far is complete
  (bare, ``"..."`` or ``\"\"\"...\"\"\"``); non-printable characters other than spaces, tabs and
  newlines are dropped; ``#`` starts a comment only where an instruction could start;
* ``ollama_prompt``: the chat route's handling — the Modelfile's SYSTEM becomes a first system
  message when the request has none, consecutive messages of one role are merged with a blank
  line, system messages are also joined into ``.System`` — then the TEMPLATE executed by the
  Go-template evaluator (``go_template``).
"""

from __future__ import annotations

import unicodedata

from go_template import execute

COMMANDS = {"from", "license", "template", "system", "adapter", "draft", "renderer", "parser",
            "parameter", "message", "requires"}


def _printable(ch: str) -> bool:
    """Go's strconv.IsPrint: letters, marks, numbers, punctuation, symbols and the ASCII space."""
    return ch == " " or unicodedata.category(ch)[0] in "LMNPS"


def _unquote(value: str) -> tuple[str, bool]:
    if value.startswith('"""'):
        return (value[3:-3], True) if len(value) >= 6 and value.endswith('"""') else ("", False)
    if value.startswith('"'):
        return (value[1:-1], True) if len(value) >= 2 and value.endswith('"') else ("", False)
    return value, True


def read_modelfile(text: str) -> list[tuple[str, str]]:
    """[(command, value)] as Ollama reads them ("model" for FROM, the parameter's name for
    PARAMETER); raises ValueError where Ollama's parser reports an error."""
    commands: list[tuple[str, str]] = []
    state, buffer, name = "nil", "", ""
    for ch in text:
        newline, space = ch in "\r\n", ch in " \t"
        if state == "nil":
            if ch == "#":
                state = "comment"
            elif not (newline or space):
                state, buffer = "name", ch
            continue
        if state == "comment":
            state = "nil" if newline else "comment"
            continue
        if state in ("name", "parameter"):
            if space:
                word = buffer.lower()
                if state == "name" and word not in COMMANDS:
                    raise ValueError(f"unknown command {buffer!r}")
                if state == "name" and word == "parameter":
                    state, buffer = "parameter", ""
                    continue
                name = buffer if state == "parameter" else {"from": "model"}.get(word, word)
                state, buffer = "value", ""
            elif ch.isalpha() or (state == "parameter" and (ch.isdigit() or ch == "_")):
                buffer += ch
            else:
                raise ValueError(f"unexpected {ch!r} in {buffer!r}")
            continue
        # state == "value"
        if newline or space:
            value, complete = _unquote(buffer.strip())
            if complete and newline:
                commands.append((name, value))
                state, buffer = "nil", ""
            else:
                buffer += ch
            continue
        if _printable(ch):
            buffer += ch
    if state == "value":
        value, complete = _unquote(buffer.strip())
        if not complete:
            raise ValueError("unexpected end of the Modelfile inside a quoted value")
        commands.append((name, value))
    elif state not in ("nil", "comment"):
        raise ValueError("unexpected end of the Modelfile")
    if not any(command == "model" for command, _ in commands):
        raise ValueError("no FROM line")
    return commands


def ollama_prompt(modelfile: str, messages: list[dict[str, str]]) -> str:
    """The prompt Ollama builds for a chat request of ``messages`` with this Modelfile."""
    return execute(*ollama_inputs(modelfile, messages))


def ollama_inputs(modelfile: str, messages: list[dict[str, str]]) -> tuple[str, dict]:
    """(the TEMPLATE, the data Ollama executes it with) for a chat request of ``messages``."""
    commands = read_modelfile(modelfile)
    template = [v for c, v in commands if c == "template"][-1]
    system = ([v for c, v in commands if c == "system"] or [""])[-1]
    assert ".Messages" in template, "a template without .Messages is run in Ollama's legacy mode"
    chat = [dict(m) for m in messages]
    if chat and chat[0]["role"] != "system" and system:
        chat.insert(0, {"role": "system", "content": system})
    systems, collated = [], []
    for message in chat:
        if message["role"] == "system":
            systems.append(message["content"])
        if collated and collated[-1]["Role"] == message["role"]:
            collated[-1]["Content"] += "\n\n" + message["content"]
        else:
            collated.append({"Role": message["role"], "Content": message["content"]})
    return template, {"System": "\n\n".join(systems), "Messages": collated, "Tools": None,
                      "Response": "", "Think": False, "IsThinkSet": False}
