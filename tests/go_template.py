"""A small evaluator of Go's ``text/template`` for the tests: enough of the language to run an
Ollama TEMPLATE as Go would, written from Go's documentation (not from the studio's code).

Covered: text and ``{{ }}`` actions with the ``{{-``/``-}}`` whitespace trims, ``{{/* */}}``
comments, ``if`` / ``else if`` / ``else`` / ``end``, ``range PIPE`` and ``range $i, $x := PIPE``,
variable declaration (``$x := ...``) and assignment (``$x = ...``) with Go's scoping (a variable
lives until the ``end`` of the block that declared it), ``.Field`` / ``$.Field`` / ``$x.Field``,
parenthesised pipelines, string (interpreted and raw) / number / bool constants, and the
functions ``eq ne lt le gt ge and or not len slice index``. Anything else raises, so a template
using a construct this evaluator does not know fails the test instead of passing by accident.
"""

from __future__ import annotations

import re
from typing import Any

_ACTION = re.compile(r'\{\{(-\s)?((?:"(?:[^"\\]|\\.)*"|`[^`]*`|[^"`])*?)(\s-)?\}\}', re.S)
_TOKEN = re.compile(r'\s*(?:("(?:[^"\\]|\\.)*")|(`[^`]*`)|(\(|\))|(:=|=)|([^\s()]+))')
_GO_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "a": "\a", "b": "\b",
               "f": "\f", "v": "\v", "'": "'"}


class GoTemplateError(Exception):
    pass


def _go_unquote(literal: str) -> str:
    out, i, body = [], 0, literal[1:-1]
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        kind = body[i + 1]
        if kind in _GO_ESCAPES:
            out.append(_GO_ESCAPES[kind])
            i += 2
        elif kind in "uU":
            width = 4 if kind == "u" else 8
            code = int(body[i + 2:i + 2 + width], 16)
            if 0xD800 <= code <= 0xDFFF:
                raise GoTemplateError(f"Go rejects a surrogate half in a string: {literal!r}")
            out.append(chr(code))
            i += 2 + width
        elif kind == "x":
            out.append(chr(int(body[i + 2:i + 4], 16)))
            i += 4
        else:
            raise GoTemplateError(f"unknown escape \\{kind} in {literal!r}")
    return "".join(out)


def _lex(template: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", body)] with the trim markers applied to the texts."""
    items: list[tuple[str, str]] = []
    at = 0
    trim_next = False
    for match in _ACTION.finditer(template):
        text = template[at:match.start()]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if match.group(1):
            text = text.rstrip(" \t\r\n")
        items.append(("text", text))
        items.append(("action", match.group(2).strip()))
        trim_next = bool(match.group(3))
        at = match.end()
    tail = template[at:]
    items.append(("text", tail.lstrip(" \t\r\n") if trim_next else tail))
    if "{{" in "".join(t for kind, t in items if kind == "text"):
        raise GoTemplateError("an unclosed action")
    return items


def _parse(items, i=0, stop=("end",)):
    """Nodes up to one of the ``stop`` keywords: returns (nodes, index, the keyword action)."""
    nodes = []
    while i < len(items):
        kind, body = items[i]
        i += 1
        if kind == "text":
            if body:
                nodes.append(("text", body))
            continue
        if body.startswith("/*"):
            if not body.endswith("*/"):
                raise GoTemplateError(f"bad comment {body!r}")
            continue
        word = body.split(None, 1)[0] if body else ""
        if word in ("end", "else"):
            if word not in stop and not (word == "else" and "else" in stop):
                raise GoTemplateError(f"unexpected {{{{ {body} }}}}")
            return nodes, i, body
        if word == "if":
            node, i = _parse_if(items, i, body[2:].strip())
            nodes.append(node)
        elif word == "range":
            header = body[5:].strip()
            names = []
            declared = re.match(r"^(\$\w*)\s*(?:,\s*(\$\w*)\s*)?:=\s*(.*)$", header, re.S)
            if declared:
                names = [n for n in declared.groups()[:2] if n]
                header = declared.group(3)
            inner, i, closing = _parse(items, i, ("end",))
            if closing != "end":
                raise GoTemplateError("range ... else is not supported here")
            nodes.append(("range", names, _tokens(header), inner))
        elif word in ("with", "define", "template", "block", "break", "continue"):
            raise GoTemplateError(f"{word} is not supported by this evaluator")
        else:
            declared = re.match(r"^(\$\w+)\s*(:=|=)\s*(.*)$", body, re.S)
            if declared:
                nodes.append(("declare" if declared.group(2) == ":=" else "assign",
                              declared.group(1), _tokens(declared.group(3))))
            else:
                nodes.append(("print", _tokens(body)))
    if stop != ("__eof__",):
        raise GoTemplateError("missing {{ end }}")
    return nodes, i, None


def _parse_if(items, i, condition):
    then, i, closing = _parse(items, i, ("end", "else"))
    otherwise = []
    if closing.startswith("else"):
        rest = closing[4:].strip()
        if rest.startswith("if "):  # else if: a nested if that shares this one's end
            node, i = _parse_if(items, i, rest[3:].strip())
            otherwise = [node]
        elif rest:
            raise GoTemplateError(f"unsupported {{{{ {closing} }}}}")
        else:
            otherwise, i, closing = _parse(items, i, ("end",))
    return ("if", _tokens(condition), then, otherwise), i


def _tokens(text: str) -> list[str]:
    tokens, at = [], 0
    text = text.strip()
    while at < len(text):
        match = _TOKEN.match(text, at)
        if not match or match.end() == at:
            raise GoTemplateError(f"cannot read {text[at:]!r}")
        tokens.append(next(g for g in match.groups() if g is not None))
        at = match.end()
    if "|" in tokens:
        raise GoTemplateError("pipes (|) are not supported by this evaluator")
    return tokens


def _truth(value: Any) -> bool:
    return value not in (None, False, 0, "") and not (isinstance(value, (list, dict)) and not value)


def _field(value: Any, names: list[str]) -> Any:
    for name in names:
        if not isinstance(value, dict) or name not in value:
            raise GoTemplateError(f"no field {name} in {type(value).__name__}")
        value = value[name]
    return value


_FUNCS = {
    "eq": lambda a, *bs: any(a == b for b in bs), "ne": lambda a, b: a != b,
    "lt": lambda a, b: a < b, "le": lambda a, b: a <= b, "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b, "not": lambda a: not _truth(a), "len": len,
    "slice": lambda x, *ij: x[slice(*ij)] if len(ij) == 2 else x[ij[0]:] if ij else x,
    "index": lambda x, *keys: _index(x, keys),
}


def _index(x, keys):
    for key in keys:
        x = x[key]
    return x


class _Scope:
    def __init__(self, root: Any):
        self.frames: list[dict[str, Any]] = [{"$": root}]

    def lookup(self, name: str) -> Any:
        for frame in reversed(self.frames):
            if name in frame:
                return frame[name]
        raise GoTemplateError(f"undefined variable {name}")

    def assign(self, name: str, value: Any) -> None:
        for frame in reversed(self.frames):
            if name in frame:
                frame[name] = value
                return
        raise GoTemplateError(f"assignment to undeclared variable {name}")


def _operand(token: str, dot: Any, scope: _Scope) -> Any:
    if token.startswith('"'):
        return _go_unquote(token)
    if token.startswith("`"):
        return token[1:-1]
    if token in ("true", "false"):
        return token == "true"
    if re.fullmatch(r"-?\d+", token):
        return int(token)
    if token == ".":
        return dot
    if token.startswith("."):
        return _field(dot, token[1:].split("."))
    if token.startswith("$"):
        name, _, rest = token.partition(".")
        value = scope.lookup(name)
        return _field(value, rest.split(".")) if rest else value
    raise GoTemplateError(f"unknown operand {token!r}")


def _evaluate(tokens: list[str], dot: Any, scope: _Scope) -> Any:
    args, i = [], 0
    while i < len(tokens):
        token = tokens[i]
        if token == "(":
            depth, j = 1, i + 1
            while depth:
                depth += {"(": 1, ")": -1}.get(tokens[j], 0)
                j += 1
            args.append(("value", _evaluate(tokens[i + 1:j - 1], dot, scope)))
            i = j
        else:
            args.append(("token", token))
            i += 1
    if not args:
        raise GoTemplateError("an empty pipeline")
    head_kind, head = args[0]
    if head_kind == "token" and head in ("and", "or"):  # short-circuit, returning an operand like Go
        values = args[1:]
        result = None
        for kind, value in values:
            result = value if kind == "value" else _operand(value, dot, scope)
            if _truth(result) != (head == "and"):
                return result
        return result
    if head_kind == "token" and head in _FUNCS:
        values = [v if k == "value" else _operand(v, dot, scope) for k, v in args[1:]]
        return _FUNCS[head](*values)
    if len(args) != 1:
        raise GoTemplateError(f"cannot call {head!r}")
    return head if head_kind == "value" else _operand(head, dot, scope)


def _run(nodes, dot, scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "print":
            value = _evaluate(node[1], dot, scope)
            out.append(value if isinstance(value, str) else "" if value is None else str(value))
        elif kind == "declare":
            scope.frames[-1][node[1]] = _evaluate(node[2], dot, scope)
        elif kind == "assign":
            scope.assign(node[1], _evaluate(node[2], dot, scope))
        elif kind == "if":
            scope.frames.append({})
            _run(node[2] if _truth(_evaluate(node[1], dot, scope)) else node[3], dot, scope, out)
            scope.frames.pop()
        elif kind == "range":
            _, names, header, inner = node
            items = _evaluate(header, dot, scope) or []
            for index, item in enumerate(items):
                scope.frames.append({})
                if len(names) == 2:
                    scope.frames[-1].update({names[0]: index, names[1]: item})
                elif names:
                    scope.frames[-1][names[0]] = item
                _run(inner, item, scope, out)
                scope.frames.pop()


def execute(template: str, data: dict[str, Any]) -> str:
    """``template`` executed over ``data`` (field names as in Go: ``Messages``, ``Role``...)."""
    nodes, _, _ = _parse(_lex(template), 0, ("__eof__",))
    out: list[str] = []
    _run(nodes, data, _Scope(data), out)
    return "".join(out)
