"""A renderer for the subset of Go's ``text/template`` that Ollama's prompt templates use.

Ollama formats a chat with a Go template over ``.System``, ``.Prompt``, ``.Response``,
``.Messages`` (each ``.Role``, ``.Content``, ``.ToolCalls``) and ``.Tools``. ``opt ollama
push`` converts a tokenizer's Jinja chat template into such a template and checks, before
uploading anything, that both render the same text; this renders the Go side without Go.

Supported: text, ``{{ pipeline }}`` with ``{{-``/``-}}`` trimming, comments, ``if`` / ``else
if`` / ``else``, ``range`` (with ``$i, $v :=`` or ``$v :=``; ``else``), ``with``, variables
(``$``, ``$x``, ``$x := …``), field chains, string/number/bool literals, parenthesised calls
and the functions ``eq ne lt le gt ge and or not len index slice print printf json``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from openpto.errors import UsageError


class TemplateError(UsageError):
    """A Go template this renderer cannot parse or evaluate."""


_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|`[^`]*`|\(|\)|:=|\||[^\s()|]+')


@dataclass
class _Node:
    kind: str  # text, output, if, range, with, assign
    text: str = ""
    expr: list[str] = field(default_factory=list)
    variables: list[str] = field(default_factory=list)
    body: list[_Node] = field(default_factory=list)
    orelse: list[_Node] = field(default_factory=list)


def _lex(source: str) -> list[tuple[str, str]]:
    """``[("text", s) | ("action", s)]`` with the trim markers already applied to the text."""
    parts: list[tuple[str, str]] = []
    pos = 0
    trim_next = False
    for match in _ACTION.finditer(source):
        text = source[pos:match.start()]
        if trim_next:
            text = text.lstrip()
        if match.group(1):
            text = text.rstrip()
        if text:
            parts.append(("text", text))
        body = match.group(2).strip()
        if not (body.startswith("/*") and body.endswith("*/")):
            parts.append(("action", body))
        trim_next = bool(match.group(3))
        pos = match.end()
    tail = source[pos:]
    if trim_next:
        tail = tail.lstrip()
    if tail:
        parts.append(("text", tail))
    return parts


def parse(source: str) -> list[_Node]:
    items = _lex(source)
    nodes, stop, _ = _parse_block(items, 0)
    if stop is not None:
        raise TemplateError(f"unexpected {{{{{stop}}}}} in the template")
    return nodes


def _parse_block(items: list[tuple[str, str]], i: int) -> tuple[list[_Node], str | None, int]:
    nodes: list[_Node] = []
    while i < len(items):
        kind, value = items[i]
        i += 1
        if kind == "text":
            nodes.append(_Node("text", text=value))
            continue
        word = value.split(None, 1)[0] if value else ""
        if word in ("end", "else"):
            return nodes, value, i
        if word in ("if", "with", "range"):
            node, i = _parse_control(word, value[len(word):].strip(), items, i)
            nodes.append(node)
            continue
        tokens = _TOKEN.findall(value)
        if len(tokens) >= 2 and tokens[0].startswith("$") and tokens[1] == ":=":
            nodes.append(_Node("assign", variables=[tokens[0]], expr=tokens[2:]))
        else:
            nodes.append(_Node("output", expr=tokens))
    return nodes, None, i


def _parse_control(word: str, rest: str, items: list[tuple[str, str]],
                   i: int) -> tuple[_Node, int]:
    tokens = _TOKEN.findall(rest)
    variables: list[str] = []
    if ":=" in tokens:
        at = tokens.index(":=")
        variables = [t.rstrip(",") for t in tokens[:at] if t != ","]
        tokens = tokens[at + 1:]
    node = _Node(word, expr=tokens, variables=variables)
    node.body, stop, i = _parse_block(items, i)
    if stop is None:
        raise TemplateError(f"{{{{{word}}}}} without {{{{end}}}}")
    if stop.startswith("else"):
        after = stop[4:].strip()
        if after.startswith("if ") or after.startswith("with "):
            inner_word = after.split(None, 1)[0]
            inner, i = _parse_control(inner_word, after[len(inner_word):].strip(), items, i)
            node.orelse = [inner]
            return node, i  # the inner block consumed the shared {{end}}
        node.orelse, stop, i = _parse_block(items, i)
        if stop != "end":
            raise TemplateError(f"{{{{else}}}} of {{{{{word}}}}} without {{{{end}}}}")
    return node, i


# -- evaluation --------------------------------------------------------------------------------


def _truth(value: Any) -> bool:
    return bool(value) if value is not None else False


def _field(value: Any, name: str) -> Any:
    if isinstance(value, dict):
        return value.get(name)
    return getattr(value, name, None)


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _printf(fmt: str, *args: Any) -> str:
    converted = re.sub(r"%v", "%s", fmt).replace("%q", '"%s"')
    return converted % args


_FUNCS: dict[str, Callable[..., Any]] = {
    "eq": lambda a, *bs: any(a == b for b in bs),
    "ne": lambda a, b: a != b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "not": lambda a: not _truth(a),
    # Go's and/or return an argument, not a bool: the first false one / the first true one
    "and": lambda *a: next((x for x in a if not _truth(x)), a[-1]),
    "or": lambda *a: next((x for x in a if _truth(x)), a[-1]),
    "len": lambda a: len(a or []),
    "index": lambda a, *keys: _index(a, keys),
    "slice": lambda a, *ix: a[ix[0]:ix[1]] if len(ix) > 1 else a[ix[0]:] if ix else a,
    "print": lambda *a: "".join(_text(x) for x in a),
    "printf": _printf,
    "json": _json,
}


def _index(value: Any, keys: tuple[Any, ...]) -> Any:
    for key in keys:
        value = value[key]
    return value


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return _json(value)
    return str(value)


class _Scope:
    def __init__(self, root: Any) -> None:
        self.frames: list[dict[str, Any]] = [{"$": root}]

    def get(self, name: str) -> Any:
        for frame in reversed(self.frames):
            if name in frame:
                return frame[name]
        raise TemplateError(f"undefined variable {name}")

    def set(self, name: str, value: Any) -> None:
        self.frames[-1][name] = value


def _operand(token: str, dot: Any, scope: _Scope) -> Any:
    if token.startswith('"'):
        return json.loads(token)
    if token.startswith("`"):
        return token[1:-1]
    if token in ("true", "false"):
        return token == "true"  # nosec B105  # a template token, not a password
    if token == "nil":  # nosec B105  # a template token, not a password
        return None
    if re.fullmatch(r"-?\d+", token):
        return int(token)
    if token == ".":  # nosec B105  # a template token, not a password
        return dot
    if token.startswith("."):
        value = dot
        for name in token[1:].split("."):
            value = _field(value, name)
        return value
    if token.startswith("$"):
        head, _, rest = token.partition(".")
        value = scope.get(head)
        for name in rest.split(".") if rest else []:
            value = _field(value, name)
        return value
    raise TemplateError(f"unknown word {token!r} in the template")


def _command(tokens: list[str], dot: Any, scope: _Scope, piped: list[Any]) -> Any:
    args, i = [], 1
    head = tokens[0] if tokens else ""
    if head in _FUNCS:
        while i < len(tokens):
            value, i = _term(tokens, i, dot, scope)
            args.append(value)
        return _FUNCS[head](*args, *piped)
    value, i = _term(tokens, 0, dot, scope)
    if i != len(tokens) or piped:
        raise TemplateError(f"cannot call {head!r} with arguments")
    return value


def _term(tokens: list[str], i: int, dot: Any, scope: _Scope) -> tuple[Any, int]:
    if tokens[i] == "(":
        depth, j = 1, i + 1
        while depth:
            if j >= len(tokens):
                raise TemplateError("unbalanced parentheses in the template")
            depth += {"(": 1, ")": -1}.get(tokens[j], 0)
            j += 1
        return _pipeline(tokens[i + 1:j - 1], dot, scope), j
    return _operand(tokens[i], dot, scope), i + 1


def _pipeline(tokens: list[str], dot: Any, scope: _Scope) -> Any:
    commands: list[list[str]] = [[]]
    depth = 0
    for token in tokens:
        depth += {"(": 1, ")": -1}.get(token, 0)
        if token == "|" and depth == 0:  # nosec B105  # a template token, not a password
            commands.append([])
        else:
            commands[-1].append(token)
    value: list[Any] = []
    for command in commands:
        value = [_command(command, dot, scope, value)]
    return value[0] if value else None


def _run(nodes: list[_Node], dot: Any, scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        if node.kind == "text":
            out.append(node.text)
        elif node.kind == "output":
            out.append(_text(_pipeline(node.expr, dot, scope)))
        elif node.kind == "assign":
            scope.set(node.variables[0], _pipeline(node.expr, dot, scope))
        elif node.kind in ("if", "with"):
            value = _pipeline(node.expr, dot, scope)
            if _truth(value):
                _run(node.body, value if node.kind == "with" else dot, scope, out)
            else:
                _run(node.orelse, dot, scope, out)
        elif node.kind == "range":
            items = _pipeline(node.expr, dot, scope) or []
            pairs = list(items.items()) if isinstance(items, dict) else list(enumerate(items))
            if not pairs:
                _run(node.orelse, dot, scope, out)
            for key, item in pairs:
                scope.frames.append({})
                if len(node.variables) == 2:
                    scope.set(node.variables[0], key)
                    scope.set(node.variables[1], item)
                elif node.variables:
                    scope.set(node.variables[0], item)
                _run(node.body, item, scope, out)
                scope.frames.pop()


def render(source: str, data: dict[str, Any]) -> str:
    """``source`` executed over ``data`` as Go's text/template would."""
    scope = _Scope(data)
    out: list[str] = []
    _run(parse(source), data, scope, out)
    return "".join(out)
