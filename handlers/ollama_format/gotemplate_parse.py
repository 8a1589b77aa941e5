"""Parser of the Go text/template subset that Ollama TEMPLATEs use (see `gotemplate` for what is supported).

Lexes the actions of a template (trim markers `{{- -}}` and comments applied), then builds a tree of text,
action, if / range / with and break / continue nodes. `parse(source)` is the entry point.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from handlers.ollama_format.gotemplate_funcs import FUNCS, TemplateError

_WS = " \t\r\n"
_TRIM_LEFT = tuple(f"-{c}" for c in _WS)  # "{{- " trims the text before
_TRIM_RIGHT = tuple(f"{c}-" for c in _WS)  # " -}}" trims the text after


@dataclass
class Tok:
    kind: str  # str num bool nil field var ident op
    value: Any
    space_before: bool = False


@dataclass
class Operand:
    kind: str  # lit field var ident pipe
    value: Any = None
    chain: tuple[str, ...] = ()


@dataclass
class Pipe:
    decl: list[str] = field(default_factory=list)
    assign: bool = False  # `=` rather than `:=`
    cmds: list[list[Operand]] = field(default_factory=list)


@dataclass
class Text:
    text: str


@dataclass
class Action:
    pipe: Pipe


@dataclass
class If:
    branches: list[tuple[Pipe, list[Any]]]
    else_: list[Any] | None = None


@dataclass
class Range:
    pipe: Pipe
    body: list[Any]
    else_: list[Any] | None = None


@dataclass
class With:
    branches: list[tuple[Pipe, list[Any]]]
    else_: list[Any] | None = None


class Break(Exception):
    pass


class Continue(Exception):
    pass


@dataclass
class BreakNode:
    pass


@dataclass
class ContinueNode:
    pass


_TOKEN_RE = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>"(?:[^"\\\n]|\\.)*")
  | (?P<raw>`[^`]*`)
  | (?P<op>:=|=|,|\(|\)|\|)
  | (?P<num>-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)
  | (?P<var>\$[A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
""", re.VERBOSE)


def _lex_action(src: str, line: int) -> list[Tok]:
    toks: list[Tok] = []
    pos, space = 0, False
    while pos < len(src):
        m = _TOKEN_RE.match(src, pos)
        if not m:
            raise TemplateError(f"line {line}: unexpected {src[pos:pos + 10]!r} in action")
        pos = m.end()
        kind, text = m.lastgroup, m.group()
        if kind == "ws":
            space = True
            continue
        toks.append(_make_tok(kind or "", text, line, space))
        space = False
    return toks


def _make_tok(kind: str, text: str, line: int, space: bool) -> Tok:
    if kind == "str":
        try:
            return Tok("str", json.loads(text), space)
        except json.JSONDecodeError as e:
            raise TemplateError(f"line {line}: bad string literal {text}") from e
    if kind == "raw":
        return Tok("str", text[1:-1], space)
    if kind == "num":
        return Tok("num", float(text) if any(c in text for c in ".eE") else int(text), space)
    if kind == "var":
        name, *chain = text.split(".")
        return Tok("var", (name, tuple(chain)), space)
    if kind == "field":
        return Tok("field", tuple(text.split(".")[1:]) if text != "." else (), space)
    if kind == "ident" and text in ("true", "false"):
        return Tok("bool", text == "true", space)
    if kind == "ident" and text == "nil":
        return Tok("nil", None, space)
    return Tok(kind, text, space)


def split_template(src: str) -> list[tuple[str, Any, int]]:
    """Text and action items, with trim markers applied. Items: ("text", str) / ("action", tokens)."""
    items: list[tuple[str, Any, int]] = []
    pos, trim_next = 0, False
    while True:
        start = src.find("{{", pos)
        text = src[pos:] if start < 0 else src[pos:start]
        if trim_next:
            text = text.lstrip(_WS)
        if start < 0:
            items.append(("text", text, 0))
            return items
        line = src.count("\n", 0, start) + 1
        body_start = start + 2
        if src[body_start:body_start + 2] in _TRIM_LEFT:
            text = text.rstrip(_WS)
            body_start += 1
        items.append(("text", text, line))
        end = _find_action_end(src, body_start, line)
        body = src[body_start:end]
        trim_next = False
        if body[-2:] in _TRIM_RIGHT:
            body, trim_next = body[:-1], True
        pos = end + 2
        stripped = body.strip(_WS)
        if stripped.startswith("/*"):
            if not stripped.endswith("*/"):
                raise TemplateError(f"line {line}: unclosed comment")
            continue
        items.append(("action", _lex_action(body, line), line))


def _find_action_end(src: str, pos: int, line: int) -> int:
    quote = ""
    i = pos
    while i < len(src) - 1:
        c = src[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 2
                continue
            if c == quote:
                quote = ""
        elif c in "\"`":
            quote = c
        elif src.startswith("}}", i):
            return i
        i += 1
    raise TemplateError(f"line {line}: unclosed action (missing '}}}}')")


class Parser:
    def __init__(self, items: list[tuple[str, Any, int]]) -> None:
        self.items = items
        self.pos = 0

    def parse(self) -> list[Any]:
        nodes, term = self._list()
        if term is not None:
            raise TemplateError(f"line {term[2]}: unexpected {{{{{term[1][0].value}}}}}")
        return nodes

    def _list(self) -> tuple[list[Any], tuple[str, Any, int] | None]:
        nodes: list[Any] = []
        while self.pos < len(self.items):
            item = self.items[self.pos]
            self.pos += 1
            kind, value, line = item
            if kind == "text":
                if value:
                    nodes.append(Text(value))
                continue
            if not value:
                raise TemplateError(f"line {line}: empty action")
            head = value[0]
            word = head.value if head.kind == "ident" else None
            if word in ("end", "else"):
                return nodes, item
            nodes.append(self._control(word, value, line))
        return nodes, None

    def _control(self, word: str | None, toks: list[Tok], line: int) -> Any:
        if word in ("if", "with"):
            return self._branchy(word, toks[1:], line)
        if word == "range":
            pipe = parse_pipe(toks[1:], line)
            body, term = self._list()
            else_ = None
            if term and term[1][0].value == "else":
                if len(term[1]) > 1:
                    raise TemplateError(f"line {term[2]}: 'else' with arguments after range")
                else_, term = self._list()
            self._expect_end(term, "range", line)
            return Range(pipe, body, else_)
        if word == "break":
            return BreakNode()
        if word == "continue":
            return ContinueNode()
        if word in ("define", "template", "block"):
            raise TemplateError(f"line {line}: '{word}' is not supported by this Go-template subset")
        return Action(parse_pipe(toks, line))

    def _branchy(self, word: str, toks: list[Tok], line: int) -> Any:
        branches: list[tuple[Any, list[Any]]] = [(parse_pipe(toks, line), [])]
        else_ = None
        while True:
            body, term = self._list()
            branches[-1] = (branches[-1][0], body)
            if term is None:
                raise TemplateError(f"line {line}: unclosed '{word}' (missing {{{{ end }}}})")
            t = term[1]
            if t[0].value == "end":
                break
            if len(t) > 1 and t[1].kind == "ident" and t[1].value == word:  # else if / else with
                branches.append((parse_pipe(t[2:], term[2]), []))
                continue
            if len(t) > 1:
                raise TemplateError(f"line {term[2]}: unexpected tokens after 'else'")
            else_, term = self._list()
            self._expect_end(term, word, line)
            break
        return If(branches, else_) if word == "if" else With(branches, else_)

    @staticmethod
    def _expect_end(term: tuple[str, Any, int] | None, word: str, line: int) -> None:
        if term is None or term[1][0].value != "end" or len(term[1]) != 1:
            raise TemplateError(f"line {line}: '{word}' must be closed by {{{{ end }}}}")


def parse_pipe(toks: list[Tok], line: int) -> Pipe:
    pipe = Pipe()
    decl_end = _decl_end(toks)
    if decl_end:
        pipe.decl = [t.value[0] for t in toks[:decl_end - 1] if t.kind == "var"]
        pipe.assign = toks[decl_end - 1].value == "="
        toks = toks[decl_end:]
    if not toks:
        raise TemplateError(f"line {line}: missing value in action")
    cmd: list[Operand] = []
    i = 0
    while i < len(toks):
        t = toks[i]
        if t.kind == "op" and t.value == "|":
            if not cmd:
                raise TemplateError(f"line {line}: empty command before '|'")
            pipe.cmds.append(cmd)
            cmd = []
            i += 1
            continue
        operand, i = _parse_operand(toks, i, line)
        cmd.append(operand)
    if not cmd:
        raise TemplateError(f"line {line}: empty command after '|'")
    pipe.cmds.append(cmd)
    return pipe


def _decl_end(toks: list[Tok]) -> int:
    """Index just past `$a :=` / `$a, $b :=` / `$a =`, or 0 when the pipeline declares nothing."""
    for n in (2, 4):
        if len(toks) >= n and toks[n - 1].kind == "op" and toks[n - 1].value in (":=", "="):
            head = toks[:n - 1]
            if all(t.kind == "var" and not t.value[1] for t in head[::2]) and all(
                    t.kind == "op" and t.value == "," for t in head[1::2]):
                return n
    return 0


def _parse_operand(toks: list[Tok], i: int, line: int) -> tuple[Operand, int]:
    t = toks[i]
    if t.kind == "op" and t.value == "(":
        depth, j = 1, i + 1
        while j < len(toks) and depth:
            if toks[j].kind == "op":
                depth += {"(": 1, ")": -1}.get(toks[j].value, 0)
            j += 1
        if depth:
            raise TemplateError(f"line {line}: unclosed '('")
        op = Operand("pipe", parse_pipe(toks[i + 1:j - 1], line))
        chain: list[str] = []
        while j < len(toks) and toks[j].kind == "field" and not toks[j].space_before and toks[j].value:
            chain += toks[j].value
            j += 1
        op.chain = tuple(chain)
        return op, j
    if t.kind in ("str", "num", "bool", "nil"):
        return Operand("lit", t.value), i + 1
    if t.kind == "field":
        return Operand("field", None, t.value), i + 1
    if t.kind == "var":
        return Operand("var", t.value[0], t.value[1]), i + 1
    if t.kind == "ident":
        if t.value not in FUNCS and t.value not in ("and", "or"):
            raise TemplateError(f'line {line}: function "{t.value}" not defined')
        return Operand("ident", t.value), i + 1
    raise TemplateError(f"line {line}: unexpected {t.value!r}")



def parse(source: str) -> list[Any]:
    """The node tree of a template (TemplateError when it is malformed or outside the subset)."""
    return Parser(split_template(source)).parse()
