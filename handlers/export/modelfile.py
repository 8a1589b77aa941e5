"""Tokenizer chat template (jinja) → Ollama TEMPLATE (Go text/template) + stop tokens, and the Modelfile.

Why: a fine-tune only answers well with the prompt format it was trained on, and only stops when its
end-of-turn token is a stop parameter (the seed's generic template is why fine-tunes "never stopped").

How (`recover_chat_format`):
1. Render the jinja template (transformers' `apply_chat_template`) on marker conversations and split the
   text at the markers: per-role prefix/suffix strings, the generation prompt, any preamble emitted when
   there is no system message (e.g. a default system prompt), and how system messages are placed (own turn,
   merged into the first/last user turn, or rejected by the template).
2. Emit a Go template over `.Messages` / `.Role` / `.Content` / `.System` that produces the same text.
3. Verify: render the emitted template with `GoTemplate` — an interpreter of the Go template subset that
   Ollama templates use, applying Ollama's own rules (Modelfile SYSTEM prepended as a system message,
   consecutive same-role messages collated) — on 1- to 3-turn conversations with and without a system
   message, and compare with `apply_chat_template`. Any mismatch raises `ExportError`: never a wrong template.
4. Known families (chatml, llama3, phi3, zephyr, mistral, gemma) are recognised from their markers as a
   sanity check (their end-of-turn token must be what was recovered); where Ollama's stock template for
   the family reproduces the tokenizer's text exactly, that stock text is emitted.

A leading BOS token is left out of the TEMPLATE when the tokenizer adds it itself: llama.cpp (and Ollama)
add BOS when tokenizing, so keeping it would double it.

`GoTemplate` is also what the Ollama stand-in (`infra.ollama_standin`) renders prompts with.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from core.errors import ExportError

log = logging.getLogger("codetune.export")

Message = dict[str, str]
RenderFn = Callable[[list[Message], bool], str]  # (messages, add_generation_prompt) -> prompt text


class TemplateError(ValueError):
    """A Go template outside the supported subset, malformed, or failing at execution."""


# =========================================================================== Go template subset
#
# Supported: text; {{ pipeline }}; trim markers {{- -}}; comments; if / else if / else / end; range (with
# `$i, $v :=`, else, break, continue); with / else; variables (`:=`, `=`, `$`); fields (.A.B, $x.A,
# (expr).A); string/number/bool/nil literals; pipes `|`; functions and or not eq ne lt le gt ge len index
# slice print printf println json. Not supported: define / template / block.

_WS = " \t\r\n"
_TRIM_LEFT = tuple(f"-{c}" for c in _WS)  # "{{- " trims the text before
_TRIM_RIGHT = tuple(f"{c}-" for c in _WS)  # " -}}" trims the text after


@dataclass
class _Tok:
    kind: str  # str num bool nil field var ident op
    value: Any
    space_before: bool = False


@dataclass
class _Operand:
    kind: str  # lit field var ident pipe
    value: Any = None
    chain: tuple[str, ...] = ()


@dataclass
class _Pipe:
    decl: list[str] = field(default_factory=list)
    assign: bool = False  # `=` rather than `:=`
    cmds: list[list[_Operand]] = field(default_factory=list)


@dataclass
class _Text:
    text: str


@dataclass
class _Action:
    pipe: _Pipe


@dataclass
class _If:
    branches: list[tuple[_Pipe, list[Any]]]
    else_: list[Any] | None = None


@dataclass
class _Range:
    pipe: _Pipe
    body: list[Any]
    else_: list[Any] | None = None


@dataclass
class _With:
    branches: list[tuple[_Pipe, list[Any]]]
    else_: list[Any] | None = None


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


@dataclass
class _BreakNode:
    pass


@dataclass
class _ContinueNode:
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


def _lex_action(src: str, line: int) -> list[_Tok]:
    toks: list[_Tok] = []
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


def _make_tok(kind: str, text: str, line: int, space: bool) -> _Tok:
    if kind == "str":
        try:
            return _Tok("str", json.loads(text), space)
        except json.JSONDecodeError as e:
            raise TemplateError(f"line {line}: bad string literal {text}") from e
    if kind == "raw":
        return _Tok("str", text[1:-1], space)
    if kind == "num":
        return _Tok("num", float(text) if any(c in text for c in ".eE") else int(text), space)
    if kind == "var":
        name, *chain = text.split(".")
        return _Tok("var", (name, tuple(chain)), space)
    if kind == "field":
        return _Tok("field", tuple(text.split(".")[1:]) if text != "." else (), space)
    if kind == "ident" and text in ("true", "false"):
        return _Tok("bool", text == "true", space)
    if kind == "ident" and text == "nil":
        return _Tok("nil", None, space)
    return _Tok(kind, text, space)


def _split_template(src: str) -> list[tuple[str, Any, int]]:
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


class _Parser:
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
                    nodes.append(_Text(value))
                continue
            if not value:
                raise TemplateError(f"line {line}: empty action")
            head = value[0]
            word = head.value if head.kind == "ident" else None
            if word in ("end", "else"):
                return nodes, item
            nodes.append(self._control(word, value, line))
        return nodes, None

    def _control(self, word: str | None, toks: list[_Tok], line: int) -> Any:
        if word in ("if", "with"):
            return self._branchy(word, toks[1:], line)
        if word == "range":
            pipe = _parse_pipe(toks[1:], line)
            body, term = self._list()
            else_ = None
            if term and term[1][0].value == "else":
                if len(term[1]) > 1:
                    raise TemplateError(f"line {term[2]}: 'else' with arguments after range")
                else_, term = self._list()
            self._expect_end(term, "range", line)
            return _Range(pipe, body, else_)
        if word == "break":
            return _BreakNode()
        if word == "continue":
            return _ContinueNode()
        if word in ("define", "template", "block"):
            raise TemplateError(f"line {line}: '{word}' is not supported by this Go-template subset")
        return _Action(_parse_pipe(toks, line))

    def _branchy(self, word: str, toks: list[_Tok], line: int) -> Any:
        branches: list[tuple[_Pipe, list[Any]]] = [(_parse_pipe(toks, line), [])]
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
                branches.append((_parse_pipe(t[2:], term[2]), []))
                continue
            if len(t) > 1:
                raise TemplateError(f"line {term[2]}: unexpected tokens after 'else'")
            else_, term = self._list()
            self._expect_end(term, word, line)
            break
        return _If(branches, else_) if word == "if" else _With(branches, else_)

    @staticmethod
    def _expect_end(term: tuple[str, Any, int] | None, word: str, line: int) -> None:
        if term is None or term[1][0].value != "end" or len(term[1]) != 1:
            raise TemplateError(f"line {line}: '{word}' must be closed by {{{{ end }}}}")


def _parse_pipe(toks: list[_Tok], line: int) -> _Pipe:
    pipe = _Pipe()
    decl_end = _decl_end(toks)
    if decl_end:
        pipe.decl = [t.value[0] for t in toks[:decl_end - 1] if t.kind == "var"]
        pipe.assign = toks[decl_end - 1].value == "="
        toks = toks[decl_end:]
    if not toks:
        raise TemplateError(f"line {line}: missing value in action")
    cmd: list[_Operand] = []
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


def _decl_end(toks: list[_Tok]) -> int:
    """Index just past `$a :=` / `$a, $b :=` / `$a =`, or 0 when the pipeline declares nothing."""
    for n in (2, 4):
        if len(toks) >= n and toks[n - 1].kind == "op" and toks[n - 1].value in (":=", "="):
            head = toks[:n - 1]
            if all(t.kind == "var" and not t.value[1] for t in head[::2]) and all(
                    t.kind == "op" and t.value == "," for t in head[1::2]):
                return n
    return 0


def _parse_operand(toks: list[_Tok], i: int, line: int) -> tuple[_Operand, int]:
    t = toks[i]
    if t.kind == "op" and t.value == "(":
        depth, j = 1, i + 1
        while j < len(toks) and depth:
            if toks[j].kind == "op":
                depth += {"(": 1, ")": -1}.get(toks[j].value, 0)
            j += 1
        if depth:
            raise TemplateError(f"line {line}: unclosed '('")
        op = _Operand("pipe", _parse_pipe(toks[i + 1:j - 1], line))
        chain: list[str] = []
        while j < len(toks) and toks[j].kind == "field" and not toks[j].space_before and toks[j].value:
            chain += toks[j].value
            j += 1
        op.chain = tuple(chain)
        return op, j
    if t.kind in ("str", "num", "bool", "nil"):
        return _Operand("lit", t.value), i + 1
    if t.kind == "field":
        return _Operand("field", None, t.value), i + 1
    if t.kind == "var":
        return _Operand("var", t.value[0], t.value[1]), i + 1
    if t.kind == "ident":
        if t.value not in _FUNCS and t.value not in ("and", "or"):
            raise TemplateError(f'line {line}: function "{t.value}" not defined')
        return _Operand("ident", t.value), i + 1
    raise TemplateError(f"line {line}: unexpected {t.value!r}")


# --------------------------------------------------------------------------- execution


def _truth(v: Any) -> bool:
    if v is None or v is False:
        return False
    if isinstance(v, (int, float, str, list, tuple, dict)):
        return bool(v)
    return True


def _go_str(v: Any) -> str:
    if v is None:
        return "<no value>"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + " ".join(_go_str(x) for x in v) + "]"
    if isinstance(v, dict):
        return "map[" + " ".join(f"{k}:{_go_str(v[k])}" for k in sorted(v)) + "]"
    return str(v)


def _go_json(v: Any) -> str:
    out = json.dumps(v, separators=(",", ":"), ensure_ascii=False)
    return out.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _sprint(*args: Any) -> str:
    out = ""
    for i, a in enumerate(args):
        if i and not isinstance(a, str) and not isinstance(args[i - 1], str):
            out += " "
        out += _go_str(a)
    return out


_VERB_RE = re.compile(r"%([-+# 0]*)(\*|\d+)?(?:\.(\*|\d*))?([a-zA-Z%])")


def _format_one(verb: str, flags: str, v: Any, prec: int | None) -> str:
    """One Go fmt verb applied to `v` (no width: the caller pads)."""
    if verb in "sv":
        text = _go_str(v)
        return text[:prec] if prec is not None and verb == "s" else text
    if verb == "q":
        return json.dumps(_go_str(v), ensure_ascii=False)
    if verb == "t":
        return _go_str(v) if isinstance(v, bool) else f"%!t({_go_type(v)}={_go_str(v)})"
    if verb == "c" and isinstance(v, int) and not isinstance(v, bool):
        return chr(v)
    if verb in "dxXob" and isinstance(v, int) and not isinstance(v, bool):
        sign = "+" if "+" in flags and v >= 0 else (" " if " " in flags and v >= 0 else "")
        digits = {"d": "d", "x": "x", "X": "X", "o": "o", "b": "b"}[verb]
        body = format(abs(v), digits)
        prefix = {"x": "0x", "X": "0X", "o": "0", "b": "0b"}.get(verb, "") if "#" in flags else ""
        return ("-" if v < 0 else sign) + prefix + body
    if verb in "feEgG" and isinstance(v, (int, float)) and not isinstance(v, bool):
        spec = ("+" if "+" in flags else "") + (f".{prec}" if prec is not None else (".6" if verb in "feE"
                                                                                    else "")) + verb
        return format(float(v), spec)
    return f"%!{verb}({_go_type(v)}={_go_str(v)})"


def _printf(fmt: str, *args: Any) -> str:
    """Go's fmt.Sprintf for the verbs templates use: %s %v %q %d %x %X %o %b %c %t %f %e %g and %%,
    with flags (- + # space 0), width and precision, either of them `*` (taken from the arguments)."""
    it = iter(args)
    missing = object()

    def sub(m: re.Match[str]) -> str:
        flags, width_s, prec_s, verb = m.groups()
        if verb == "%":
            return "%"
        width: int | None = None
        prec: int | None = None
        bad = ""
        if width_s == "*":
            w = next(it, missing)
            if isinstance(w, int) and not isinstance(w, bool):
                width = w
                if width < 0:
                    flags, width = flags + "-", -width
            else:
                bad += "%!(BADWIDTH)"
        elif width_s:
            width = int(width_s)
        if prec_s == "*":
            pv = next(it, missing)
            if isinstance(pv, int) and not isinstance(pv, bool):
                prec = max(pv, 0)
            else:
                bad += "%!(BADPREC)"
        elif prec_s is not None:
            prec = int(prec_s or 0)
        v = next(it, missing)
        if v is missing:
            return f"{bad}%!{verb}(MISSING)"
        text = bad + _format_one(verb, flags, v, prec)
        if width is not None and len(text) < width:
            pad = width - len(text)
            if "-" in flags:
                text += " " * pad
            elif "0" in flags and verb in "dxXobfeEgG" and not isinstance(v, str):
                sign = text[0] if text[:1] in "+- " else ""
                text = sign + "0" * pad + text[len(sign):]
            else:
                text = " " * pad + text
        return text

    out = _VERB_RE.sub(sub, fmt)
    extra = list(it)
    if extra:
        out += "%!(EXTRA " + ", ".join(f"{_go_type(x)}={_go_str(x)}" for x in extra) + ")"
    return out


def _index(v: Any, *keys: Any) -> Any:
    for k in keys:
        try:
            v = v.get(k) if isinstance(v, Mapping) else v[k]
        except (IndexError, TypeError, KeyError) as e:
            raise TemplateError(f"index of {type(v).__name__}: {e}") from e
    return v


def _slice(v: Any, *bounds: int) -> Any:
    if len(bounds) > 2:
        raise TemplateError("slice: too many indices for a string or list")
    start = bounds[0] if bounds else 0
    end = bounds[1] if len(bounds) > 1 else len(v)
    if not 0 <= start <= end <= len(v):
        raise TemplateError(f"slice: index out of range [{start}:{end}] with length {len(v)}")
    return v[start:end]


def _cmp(op: str) -> Callable[[Any, Any], bool]:
    def f(a: Any, b: Any) -> bool:
        try:
            return {"lt": a < b, "le": a <= b, "gt": a > b, "ge": a >= b}[op]
        except TypeError as e:
            raise TemplateError(f"{op}: incompatible types for comparison") from e

    return f


_FUNCS: dict[str, Callable[..., Any]] = {
    "not": lambda v: not _truth(v),
    "eq": lambda a, *bs: any(a == b for b in bs),
    "ne": lambda a, b: a != b,
    "lt": _cmp("lt"), "le": _cmp("le"), "gt": _cmp("gt"), "ge": _cmp("ge"),
    "len": lambda v: len(v),
    "index": _index,
    "slice": _slice,
    "print": _sprint,
    "printf": _printf,
    "println": lambda *a: " ".join(_go_str(x) for x in a) + "\n",
    "json": _go_json,
}


class _Exec:
    def __init__(self, root: Any) -> None:
        self.root = root
        self.scopes: list[dict[str, Any]] = [{"$": root}]
        self.out: list[str] = []

    def run(self, nodes: list[Any], dot: Any) -> None:
        for node in nodes:
            self._node(node, dot)

    def _node(self, node: Any, dot: Any) -> None:
        if isinstance(node, _Text):
            self.out.append(node.text)
        elif isinstance(node, _Action):
            value = self._pipe(node.pipe, dot)
            if not node.pipe.decl:
                self.out.append(_go_str(value))
        elif isinstance(node, _If):
            self._if(node, dot)
        elif isinstance(node, _With):
            self._with(node, dot)
        elif isinstance(node, _Range):
            self._range(node, dot)
        elif isinstance(node, _BreakNode):
            raise _Break
        elif isinstance(node, _ContinueNode):
            raise _Continue

    def _scoped(self, nodes: list[Any], dot: Any, bind: dict[str, Any] | None = None) -> None:
        self.scopes.append(dict(bind or {}))
        try:
            self.run(nodes, dot)
        finally:
            self.scopes.pop()

    def _if(self, node: _If, dot: Any) -> None:
        for pipe, body in node.branches:
            if _truth(self._pipe(pipe, dot)):
                self._scoped(body, dot)
                return
        if node.else_ is not None:
            self._scoped(node.else_, dot)

    def _with(self, node: _With, dot: Any) -> None:
        for pipe, body in node.branches:
            value = self._pipe(pipe, dot)
            if _truth(value):
                self._scoped(body, value)
                return
        if node.else_ is not None:
            self._scoped(node.else_, dot)

    def _range(self, node: _Range, dot: Any) -> None:
        value = self._pipe(_Pipe(cmds=node.pipe.cmds), dot)
        pairs = list(_range_pairs(value))
        if not pairs:
            if node.else_ is not None:
                self._scoped(node.else_, dot)
            return
        for key, elem in pairs:
            names = node.pipe.decl
            bind = {names[0]: elem} if len(names) == 1 else dict(zip(names, (key, elem), strict=False))
            try:
                self._scoped(node.body, elem, bind)
            except _Continue:
                continue
            except _Break:
                break

    def _pipe(self, pipe: _Pipe, dot: Any) -> Any:
        value: Any = _MISSING
        for cmd in pipe.cmds:
            value = self._command(cmd, dot, value)
        for name in pipe.decl:
            if pipe.assign:
                self._assign(name, value)
            else:
                self.scopes[-1][name] = value
        return value

    def _assign(self, name: str, value: Any) -> None:
        for scope in reversed(self.scopes):
            if name in scope:
                scope[name] = value
                return
        raise TemplateError(f"undefined variable: {name}")

    def _command(self, cmd: list[_Operand], dot: Any, piped: Any) -> Any:
        head = cmd[0]
        if head.kind == "ident":
            if head.value in ("and", "or"):
                return self._logic(head.value, cmd[1:], dot, piped)
            args = [self._operand(op, dot) for op in cmd[1:]]
            if piped is not _MISSING:
                args.append(piped)
            try:
                return _FUNCS[head.value](*args)
            except TemplateError:
                raise
            except (TypeError, ValueError) as e:
                raise TemplateError(f"error calling {head.value}: {e}") from e
        if len(cmd) > 1 or piped is not _MISSING:
            raise TemplateError("can't give argument to non-function")
        return self._operand(head, dot)

    def _logic(self, name: str, ops: list[_Operand], dot: Any, piped: Any) -> Any:
        thunks: list[Callable[[], Any]] = [functools.partial(self._operand, op, dot) for op in ops]
        if piped is not _MISSING:
            thunks.append(lambda: piped)
        if not thunks:
            raise TemplateError(f"wrong number of args for {name}: want at least 1 got 0")
        value: Any = None
        for thunk in thunks:
            value = thunk()
            if _truth(value) != (name == "and"):
                return value
        return value

    def _operand(self, op: _Operand, dot: Any) -> Any:
        if op.kind == "lit":
            return op.value
        if op.kind == "field":
            return _fields(dot, op.chain)
        if op.kind == "var":
            return _fields(self._lookup(op.value), op.chain)
        if op.kind == "pipe":
            return _fields(self._pipe(op.value, dot), op.chain)
        if op.kind == "ident":  # a function used as an operand: call it without arguments
            return self._command([op], dot, _MISSING)
        raise TemplateError(f"bad operand {op.kind}")

    def _lookup(self, name: str) -> Any:
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        raise TemplateError(f"undefined variable: {name}")


_MISSING = object()


def _fields(value: Any, chain: Sequence[str]) -> Any:
    """`.A.B` over the template's data, which is dicts only (the documented Ollama fields: .System, .Prompt,
    .Response, .Messages with .Role/.Content/.ToolCalls, .Tools, ...). No attribute access on Python values:
    `.Content.__class__` is a template error, as a field of a string is in Go."""
    for name in chain:
        if isinstance(value, Mapping):
            value = value.get(name)  # Ollama parses with missingkey=zero
        elif value is None:
            raise TemplateError(f"nil pointer evaluating .{name}")
        else:
            raise TemplateError(f"can't evaluate field {name} in type {_go_type(value)}")
    return value


def _go_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float64"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "[]interface {}"
    return "interface {}"


def _range_pairs(value: Any) -> Iterator[tuple[Any, Any]]:
    if value is None:
        return
    if isinstance(value, Mapping):
        for k in sorted(value):
            yield k, value[k]
    elif isinstance(value, int) and not isinstance(value, bool):
        for i in range(value):
            yield i, i
    elif isinstance(value, (list, tuple, str)):
        yield from enumerate(value)
    else:
        raise TemplateError(f"range can't iterate over {_go_str(value)}")


# --------------------------------------------------------------------------- identifiers / legacy cut


def _identifiers(nodes: list[Any]) -> set[str]:
    found: set[str] = set()

    def pipe(p: _Pipe) -> None:
        for cmd in p.cmds:
            for op in cmd:
                if op.kind == "field":
                    found.update(op.chain)
                elif op.kind == "var":
                    found.add(op.value)
                    found.update(op.chain)
                elif op.kind == "pipe":
                    pipe(op.value)

    def walk(ns: list[Any] | None) -> None:
        for n in ns or []:
            if isinstance(n, _Action):
                pipe(n.pipe)
            elif isinstance(n, (_If, _With)):
                for p, body in n.branches:
                    pipe(p)
                    walk(body)
                walk(n.else_)
            elif isinstance(n, _Range):
                pipe(n.pipe)
                walk(n.body)
                walk(n.else_)

    walk(nodes)
    return {name.lower() for name in found}


def _mentions_response(p: _Pipe) -> bool:
    return any((op.kind == "field" and "Response" in op.chain)
               or (op.kind == "pipe" and _mentions_response(op.value)) for cmd in p.cmds for op in cmd)


def _cut_after_response(nodes: list[Any]) -> list[Any]:
    """Ollama's legacy rendering of the last turn: keep everything up to `{{ .Response }}`, drop the rest."""
    cut = False

    def walk(ns: list[Any] | None) -> list[Any] | None:
        nonlocal cut
        if ns is None:
            return None
        kept = []
        for n in ns:
            if cut:
                continue
            if isinstance(n, _Action) and _mentions_response(n.pipe):
                cut = True
            elif isinstance(n, (_If, _With)):
                n = type(n)([(p, walk(body) or []) for p, body in n.branches], walk(n.else_))
            elif isinstance(n, _Range):
                n = _Range(n.pipe, walk(n.body) or [], walk(n.else_))
            kept.append(n)
        return kept

    return walk(nodes) or []


# --------------------------------------------------------------------------- public: GoTemplate


class GoTemplate:
    """A parsed Ollama TEMPLATE; `render_chat` applies Ollama's message rules (see module docstring)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.nodes = _Parser(_split_template(source)).parse()
        self.vars = _identifiers(self.nodes)
        if "messages" not in self.vars and "response" not in self.vars:
            # Ollama appends {{ .Response }} to templates that mention neither
            self.nodes = [*self.nodes, _Action(_Pipe(cmds=[[_Operand("field", None, ("Response",))]]))]

    def execute(self, data: Any) -> str:
        """Plain text/template execution with `data` as dot."""
        return _execute(self.nodes, data)

    def render_chat(self, messages: Sequence[Mapping[str, Any]], system: str | None = None) -> str:
        """The prompt Ollama builds for /api/chat: SYSTEM prepended unless the chat starts with a system
        message, consecutive same-role messages merged, then `.Messages` (or legacy `.Prompt`) rendering."""
        msgs = [dict(m) for m in messages]
        if system and (not msgs or msgs[0].get("role") != "system"):
            msgs.insert(0, {"role": "system", "content": system})
        sys_text, collated = collate(msgs)
        if "messages" in self.vars:
            return self.execute({"System": sys_text, "Messages": collated, "Tools": None, "Response": "",
                                 "Think": False, "IsThinkSet": False})
        return self._legacy(collated)

    def _legacy(self, messages: list[dict[str, Any]]) -> str:
        out: list[str] = []
        state = {"System": "", "Prompt": "", "Response": ""}

        def flush() -> None:
            out.append(self.execute({**state, "Think": False, "IsThinkSet": False}))
            state.update(System="", Prompt="", Response="")

        for m in messages:
            role, content = m["Role"], m["Content"]
            if role == "system":
                if state["Prompt"] or state["Response"]:
                    flush()
                state["System"] = content
            elif role == "user":
                if state["Response"]:
                    flush()
                state["Prompt"] = content
            elif role == "assistant":
                state["Response"] = content
        out.append(_execute(_cut_after_response(self.nodes), {**state, "Think": False, "IsThinkSet": False}))
        return "".join(out)


def _execute(nodes: list[Any], data: Any) -> str:
    ex = _Exec(data)
    try:
        ex.run(nodes, data)
    except (_Break, _Continue) as e:
        raise TemplateError("break/continue outside range") from e
    return "".join(ex.out)


def collate(messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Ollama's `collate`: system texts joined by blank lines, consecutive same-role messages (not tool)
    merged with a blank line; messages become Go-style structs (`Role`, `Content`, …)."""
    system: list[str] = []
    out: list[dict[str, Any]] = []
    for m in messages:
        role, content = str(m.get("role", "")), str(m.get("content") or "")
        if role == "system":
            system.append(content)
        if out and out[-1]["Role"] == role and role != "tool":
            out[-1]["Content"] += "\n\n" + content
        else:
            out.append({"Role": role, "Content": content, "Thinking": "", "Images": None,
                        "ToolCalls": None, "ToolName": m.get("tool_name", ""), "ToolCallID": ""})
    return "\n\n".join(system), out


# =========================================================================== chat template recovery

# Ollama's stock templates (ollama/ollama template/*.gotmpl) for families whose text the recovered
# format may be checked against. gemma's stock template needs `continue`/`printf` state and merges the
# system prompt with "\n" (HF gemma rejects system messages): it is recognised but not emitted.
STOCK_TEMPLATES: dict[str, str] = {
    "chatml": "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
              "<|im_start|>assistant\n",
    "llama3": "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}"
              "<|eot_id|>\n{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
    "phi3": "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
    "zephyr": "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}</s>\n{{ end }}<|assistant|>\n",
    "mistral": '[INST] {{ range $index, $_ := .Messages }}\n{{- if eq .Role "system" }}{{ .Content }}\n\n'
               '{{ else if eq .Role "user" }}{{ .Content }}[/INST]\n{{- else if eq .Role "assistant" }} '
               "{{ .Content }}</s>[INST] {{ end }}\n{{- end }}",
}


@dataclass(frozen=True)
class _Family:
    name: str
    markers: tuple[str, ...]  # all present (with end_of_turn) in a rendered conversation → this family
    end_of_turn: str  # must then be what ends a recovered assistant turn


FAMILIES: tuple[_Family, ...] = (
    _Family("chatml", ("<|im_start|>", "<|im_end|>"), "<|im_end|>"),
    _Family("llama3", ("<|start_header_id|>", "<|end_header_id|>"), "<|eot_id|>"),
    _Family("phi3", ("<|user|>", "<|end|>"), "<|end|>"),
    _Family("zephyr", ("<|user|>", "<|assistant|>"), "</s>"),
    _Family("gemma", ("<start_of_turn>", "<end_of_turn>"), "<end_of_turn>"),
    _Family("mistral", ("[INST]", "[/INST]"), "</s>"),
)

_SPECIAL_RE = re.compile(r"<\|[^\s<>|]{1,48}\|>|</?[A-Za-z_][A-Za-z0-9_.-]{0,48}>|\[/?[A-Z_]{2,24}\]")

# Marker contents: plain words, so templates that trim or strip content leave them intact.
_MK = {"s": "QxSYSxQ", "u1": "QxUSR1xQ", "a1": "QxAST1xQ", "u2": "QxUSR2xQ"}

# Conversations every emitted template must reproduce (with system ones skipped if the template rejects
# system messages).
_CHECKS: tuple[tuple[tuple[str, str], ...], ...] = (
    (("user", "Hello, how are you?"),),
    (("user", "Hello, how are you?"), ("assistant", "I'm fine, thanks."), ("user", "What is 2+2?")),
    (("system", "You are a terse assistant."), ("user", "Hello, how are you?")),
    (("system", "You are a terse assistant."), ("user", "What is the capital of France?"),
     ("assistant", "Paris."), ("user", "And of Spain?"), ("assistant", "Madrid."),
     ("user", "Thanks! Which one is bigger?")),
    (("system", ""), ("user", "Hello, how are you?")),  # an empty system message is still a system message
    (("system", ""), ("user", "Hello, how are you?"), ("assistant", "Fine."), ("user", "What is 2+2?")),
)


@dataclass(frozen=True)
class ChatFormat:
    """What was recovered from a chat template, and the Ollama TEMPLATE + stop list made from it."""

    template: str
    stop: list[str]
    family: str | None  # recognised family (sanity-checked), None for an unknown format
    stock: bool  # True when `template` is Ollama's stock text for `family`
    system_mode: str  # turn | merged_first | merged_last | unsupported
    notes: tuple[str, ...] = ()


@dataclass
class _Parts:
    pre: dict[str, str]
    post: dict[str, str]
    head: str  # emitted before the first message when there is no system message
    gen: str  # generation prompt
    system_mode: str
    sep: str = "\n\n"  # system/user separator in the merged modes
    empty_system: str | None = None  # text before the first user turn when the system message is empty


def recover_chat_format(render: RenderFn, *, bos_token: str | None = None, eos_token: str | None = None,
                        add_bos: bool = True, special_tokens: Iterable[str] = (),
                        now: datetime | None = None) -> ChatFormat:
    """Recover an Ollama TEMPLATE + stop list from `render` (a chat-template renderer); see module doc.

    `now`: the instant every render sees as the current time (default: the time of the call), so a chat
    template that prints today's date renders the same date throughout recovery and verification.
    """
    specials = sorted({t for t in special_tokens if t}, key=len, reverse=True)
    r = _Renderer(render, bos_token if add_bos else None)
    now = now or datetime.now()
    with pinned_clock(now):
        parts = _recover_parts(r)
        full = r(_markers("u1", "a1", "u2"), True)
        family = _recognise(full, parts)
        notes = _edge_notes(r, now)
        if parts.system_mode == "unsupported":
            notes.append("the chat template rejects system messages; the TEMPLATE merges them into the first "
                         "user turn (blank-line separated)")
        candidates = []
        if family and family in STOCK_TEMPLATES:
            candidates.append((STOCK_TEMPLATES[family], True))
        modes = EMPTY_SYSTEM_MODES if parts.system_mode == "turn" else ("absent", "present")
        candidates += [(emit_template(parts, empty_system=m), False) for m in modes
                       if m != "literal" or parts.empty_system is not None]
        errors = []
        for text, stock in candidates:
            problem = _verify(text, r, check_system=parts.system_mode != "unsupported")
            if problem is None:
                stop, dropped = _reasoning_safe_stops(r, _stops(parts, eos_token, specials), specials)
                if dropped:
                    notes.append(f"left {', '.join(dropped)} out of the stop list: the model emits "
                                 f"{'it' if len(dropped) == 1 else 'them'} between its reasoning and its answer, "
                                 "so stopping there would cut the answer off")
                return ChatFormat(text, stop, family, stock, parts.system_mode, tuple(notes))
            errors.append(problem)
            if stock:
                log.info("Ollama's stock %s template differs from this tokenizer's rendering: %s", family,
                         problem)
    raise ExportError(f"cannot translate the chat template to an Ollama TEMPLATE: {errors[-1]}")


def chat_format_for_tokenizer(tokenizer: Any, chat_template: str | None = None, *, now: datetime | None = None
                              ) -> ChatFormat:
    """`recover_chat_format` for a transformers tokenizer (its own template unless one is given)."""
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ExportError("the tokenizer has no chat_template; pass one (or an explicit Ollama TEMPLATE)")
    if isinstance(template, dict):  # several named templates: the default one is the chat template
        template = template.get("default") or next(iter(template.values()))

    def render(messages: list[Message], gen: bool) -> str:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=gen)

    bos = getattr(tokenizer, "bos_token", None)
    return recover_chat_format(
        render, bos_token=bos, eos_token=getattr(tokenizer, "eos_token", None),
        add_bos=_adds_bos(tokenizer), special_tokens=_tokenizer_specials(tokenizer), now=now)


def chat_format_from_jinja(chat_template: str, *, bos_token: str | None = "<s>", eos_token: str | None = "</s>",
                           add_bos: bool = True, special_tokens: Iterable[str] = (), now: datetime | None = None
                           ) -> ChatFormat:
    """`recover_chat_format` for a bare jinja chat template, rendered like transformers renders it."""
    from transformers.utils.chat_template_utils import render_jinja_template

    def render(messages: list[Message], gen: bool) -> str:
        # transformers annotates `-> str`; it returns (rendered conversations, generation indices)
        texts, _ = cast("tuple[list[str], Any]", render_jinja_template(
            [messages], chat_template=chat_template, add_generation_prompt=gen,
            bos_token=bos_token or "", eos_token=eos_token or ""))
        return texts[0]

    return recover_chat_format(render, bos_token=bos_token, eos_token=eos_token, add_bos=add_bos,
                               special_tokens=[*special_tokens, *(t for t in (bos_token, eos_token) if t)], now=now)


def ollama_template(tokenizer_dir: Path) -> tuple[str, list[str]]:
    """The Ollama TEMPLATE and stop list for the chat template of the tokenizer in `tokenizer_dir`."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(Path(tokenizer_dir))
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot load the tokenizer in {tokenizer_dir}: {e}") from e
    fmt = chat_format_for_tokenizer(tokenizer)
    for note in fmt.notes:
        log.warning("Ollama TEMPLATE for %s: %s", Path(tokenizer_dir).name, note)
    return fmt.template, fmt.stop


# --------------------------------------------------------------------------- recovery internals


class _Renderer:
    def __init__(self, render: RenderFn, strip_bos: str | None) -> None:
        self.render = render
        self.strip_bos = strip_bos

    def __call__(self, messages: list[Message], gen: bool) -> str:
        try:
            text = self.render(messages, gen)
        except Exception as e:  # jinja raise_exception → TemplateError, etc.
            raise _RenderRejected(str(e)) from e
        if self.strip_bos and text.startswith(self.strip_bos):
            text = text[len(self.strip_bos):]
        return text


class _RenderRejected(Exception):
    pass


def _markers(*keys: str) -> list[Message]:
    role = {"s": "system", "u": "user", "a": "assistant"}
    return [{"role": role[k[0]], "content": _MK[k]} for k in keys]


def _split(text: str, keys: Sequence[str]) -> list[str]:
    """Text around the markers of `keys`, which must each occur once, in this order."""
    out, pos = [], 0
    for k in keys:
        i = text.find(_MK[k], pos)
        if i < 0 or text.count(_MK[k]) != 1:
            raise ExportError(f"the chat template does not render message contents verbatim and in order "
                              f"(marker for {k!r} not found once in {text!r})")
        out.append(text[pos:i])
        pos = i + len(_MK[k])
    out.append(text[pos:])
    return out


def _render_split(r: _Renderer, keys: Sequence[str], gen: bool) -> list[str]:
    try:
        return _split(r(_markers(*keys), gen), keys)
    except _RenderRejected as e:
        raise ExportError(f"the chat template failed on a {'/'.join(keys)} conversation: {e}") from e


def _recover_parts(r: _Renderer) -> _Parts:
    head_u, tail_u_gen = _render_split(r, ["u1"], True)
    _, tail_u = _render_split(r, ["u1"], False)
    _, x_ua, x_au, _ = _render_split(r, ["u1", "a1", "u2"], True)
    _, _, tail_a = _render_split(r, ["u1", "a1"], False)
    post_u = _boundary_prefix(tail_u, tail_u_gen)
    gen = tail_u_gen[len(post_u):]
    pre_a = _strip_prefix(x_ua, post_u, "user→assistant text", "end of a user turn")
    post_a = _boundary_prefix(tail_a, x_au)
    pre_u = x_au[len(post_a):]
    if not head_u.endswith(pre_u):
        raise ExportError(f"inconsistent user-turn prefix: first turn starts with {head_u!r}, later turns "
                          f"with {pre_u!r}")
    parts = _Parts(pre={"user": pre_u, "assistant": pre_a}, post={"user": post_u, "assistant": post_a},
                   head=head_u[:len(head_u) - len(pre_u)], gen=gen, system_mode="turn")
    _recover_system(r, parts)
    return parts


def _recover_system(r: _Renderer, parts: _Parts) -> None:
    pre_u = parts.pre["user"]
    try:
        text = r(_markers("s", "u1"), True)
        long = r(_markers("s", "u1", "a1", "u2"), True)
    except _RenderRejected:
        parts.system_mode = "unsupported"
        return
    with contextlib.suppress(_RenderRejected, ExportError):
        before, _ = _split(r([{"role": "system", "content": ""}, *_markers("u1")], True), ["u1"])
        if before.endswith(pre_u):
            parts.empty_system = before[:len(before) - len(pre_u)]
    head_s, x_su, _ = _split(text, ["s", "u1"])
    if x_su.endswith(pre_u) and not (pre_u and head_s.endswith(pre_u)):
        parts.pre["system"] = head_s
        parts.post["system"] = x_su[:len(x_su) - len(pre_u)]
        return
    order = sorted(["s", "u1", "a1", "u2"], key=lambda k: long.find(_MK[k]))
    if order == ["u1", "a1", "s", "u2"]:
        parts.system_mode, parts.sep = "merged_last", _split(long, order)[3]
        return
    if order == ["s", "u1", "a1", "u2"] and head_s == parts.head + pre_u:
        parts.system_mode, parts.sep = "merged_first", x_su
        return
    raise ExportError(f"cannot place system messages: a system/user conversation renders as {text!r}")


def _boundary_prefix(a: str, b: str) -> str:
    """Common prefix of `a` and `b`, backed off to a token boundary if both continue past it."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    if n == len(a) or n == len(b):
        return a[:n]
    for k in range(n, -1, -1):  # both diverge: back off to a newline or a special-token boundary
        if k == 0 or b[k - 1] == "\n" or b[k - 1] == ">" or _SPECIAL_RE.match(b, k):
            return a[:k]
    return a[:0]


def _strip_prefix(text: str, prefix: str, what: str, label: str) -> str:
    if not text.startswith(prefix):
        raise ExportError(f"inconsistent {what}: {text!r} does not start with the {label} {prefix!r}")
    return text[len(prefix):]


def _recognise(full: str, parts: _Parts) -> str | None:
    for fam in FAMILIES:
        if all(m in full for m in (*fam.markers, fam.end_of_turn)):
            if fam.end_of_turn not in parts.post["assistant"]:
                raise ExportError(f"the chat template looks like {fam.name} but an assistant turn ends with "
                                  f"{parts.post['assistant']!r}, not {fam.end_of_turn!r}")
            return fam.name
    return None


def _lit(text: str) -> str:
    """Literal text for a Go template ('{{' cannot appear raw)."""
    return text.replace("{{", '{{ "{{" }}')


def _uniform(parts: _Parts, roles: Sequence[str]) -> tuple[str, str] | None:
    """(A, B) when every role's prefix is A + role + B and all suffixes are equal; else None."""
    if len({parts.post[r] for r in roles}) != 1:
        return None
    shapes = set()
    for role in roles:
        pieces = parts.pre[role].split(role)
        if len(pieces) != 2:
            return None
        shapes.add((pieces[0], pieces[1]))
    return shapes.pop() if len(shapes) == 1 else None


EMPTY_SYSTEM_MODES = ("absent", "present", "silent", "literal")
# How a chat template treats a system message with empty content. Ollama's `.System` is the joined text
# of the system messages, so it is empty both when there is none and when there is an empty one:
# - absent:  the chat template skips it (`{% if system_message %}`): the TEMPLATE skips empty system turns
#            and shows the no-system preamble when `.System` is empty;
# - present: it renders an empty system turn: the TEMPLATE decides by the first message's role instead;
# - silent:  it renders neither the system turn nor the no-system preamble;
# - literal: it renders some other text (recovered as `_Parts.empty_system`), which the TEMPLATE emits.
_FIRST_IS_SYSTEM = '(eq (index $.Messages 0).Role "system")'


def emit_template(parts: _Parts, empty_system: str = "absent") -> str:
    """The Go template for recovered parts (literal text never followed/preceded by trim markers)."""
    turn = parts.system_mode == "turn"
    by_role = empty_system in ("present", "silent", "literal")  # "is there a system message": the first's role
    skip_empty = empty_system in ("absent", "silent", "literal")  # system turns with no content: not rendered
    instead = f"{{{{ else }}}}{_lit(parts.empty_system or '')}" if empty_system == "literal" else ""
    roles = ["system", "user", "assistant"] if turn else ["user", "assistant"]
    head = ""
    if parts.head:
        cond = f"or (not .Messages) (not {_FIRST_IS_SYSTEM})" if by_role else "not .System"
        head = f"{{{{- if {cond} }}}}{_lit(parts.head)}{{{{ end }}}}" if turn else _lit(parts.head)
    shape = _uniform(parts, roles) if turn else None
    if shape:
        a, b = shape
        body = (f"{_lit(a)}{{{{ .Role }}}}{_lit(b)}{{{{ .Content }}}}{_lit(parts.post['user'])}")
        if skip_empty:
            body = f'{{{{ if or .Content (ne .Role "system") }}}}{body}{instead}{{{{ end }}}}'
        return f"{head}{{{{- range .Messages }}}}{body}{{{{ end }}}}{_lit(parts.gen)}"
    branches = []
    for i, role in enumerate(roles):
        kw = "if" if i == 0 else "else if"
        content = "{{ .Content }}"
        if role == "user" and not turn:
            has_system = _FIRST_IS_SYSTEM if empty_system == "present" else "$.System"
            content = f"{{{{ if and {has_system} {_merge_condition(parts.system_mode)} }}}}{{{{ $.System }}}}" \
                      f"{_lit(parts.sep)}{{{{ end }}}}{{{{ .Content }}}}"
        turn_text = f"{_lit(parts.pre[role])}{content}{_lit(parts.post[role])}"
        if role == "system" and skip_empty:
            turn_text = f"{{{{ if .Content }}}}{turn_text}{instead}{{{{ end }}}}"
        branches.append(f'{{{{ {kw} eq .Role "{role}" }}}}{turn_text}')
    loop = "{{- range $i, $_ := .Messages }}" if not turn else "{{- range .Messages }}"
    return f"{head}{loop}{''.join(branches)}{{{{ end }}}}{{{{ end }}}}{_lit(parts.gen)}"


def _merge_condition(mode: str) -> str:
    if mode == "merged_last":
        return "(eq (len (slice $.Messages $i)) 1)"
    return "(eq $i 1)"  # Messages[0] is the system message, the first user turn follows it


def _verify(template: str, r: _Renderer, *, check_system: bool) -> str | None:
    """None when `template` reproduces the tokenizer's prompts, else a description of the first mismatch."""
    try:
        tmpl = GoTemplate(template)
    except TemplateError as e:
        return f"emitted template does not parse: {e}"
    for conv in _CHECKS:
        if not check_system and conv[0][0] == "system":
            continue
        messages = [{"role": role, "content": content} for role, content in conv]
        try:
            expected = r(messages, True)
        except _RenderRejected as e:
            return f"the chat template rejects a {'/'.join(m['role'] for m in messages)} conversation: {e}"
        try:
            got = tmpl.render_chat(messages)
        except TemplateError as e:
            return f"emitted template fails: {e}"
        if got != expected:
            at = next((i for i, (x, y) in enumerate(zip(got, expected, strict=False)) if x != y),
                      min(len(got), len(expected)))
            roles = "/".join(m["role"] for m in messages)
            return (f"{roles} conversation differs at char {at}: tokenizer gives "
                    f"{expected[max(0, at - 30):at + 30]!r}, TEMPLATE gives {got[max(0, at - 30):at + 30]!r}")
    return None


@contextlib.contextmanager
def pinned_clock(now: datetime) -> Iterator[None]:
    """Make transformers' `strftime_now` (the chat templates' only clock) return `now` meanwhile."""
    from transformers.utils import chat_template_utils as ctu

    real = ctu.datetime

    class _Pinned(real):  # type: ignore[valid-type,misc]
        @classmethod
        def now(cls, tz: Any = None) -> datetime:
            return now if tz is None else now.astimezone(tz)

    ctu.datetime = _Pinned  # type: ignore[misc]
    try:
        yield
    finally:
        ctu.datetime = real  # type: ignore[misc]


_OTHER_DAY = datetime(2001, 2, 3, 4, 5, 6)
_PADDED = "\n  {}  \n"


def _edge_notes(r: _Renderer, now: datetime) -> list[str]:
    """What the TEMPLATE cannot do like the chat template, said once at export (Ollama's template
    functions are Go's text/template builtins plus `json`: no clock and no string functions)."""
    notes: list[str] = []
    convs = []
    for keys in (("u1", "a1", "u2"), ("s", "u1", "a1", "u2")):
        with contextlib.suppress(_RenderRejected):
            convs.append((_markers(*keys), r(_markers(*keys), True)))
    if not convs:
        return notes
    with pinned_clock(_OTHER_DAY):
        moved = [r(conv, True) != text for conv, text in convs]
    if any(moved):
        notes.append(f"the chat template prints the current date; Ollama templates have no date function, so "
                     f"the TEMPLATE carries the export date ({now:%Y-%m-%d}): export again to move it")
    conv = convs[-1][0]
    padded = [{**m, "content": _PADDED.format(m["content"])} for m in conv]
    try:
        text = r(padded, True)
    except _RenderRejected:
        return notes
    trimmed = [m["content"].strip() for m in padded if m["content"] not in text and m["content"].strip() in text]
    if trimmed:
        notes.append("the chat template trims whitespace around message contents; Ollama templates have no "
                     "string functions, so the TEMPLATE keeps it: send messages without leading or trailing "
                     "whitespace to get the prompt the model was trained on")
    return notes


def _reasoning_safe_stops(r: _Renderer, stops: list[str], specials: Sequence[str]) -> tuple[list[str], list[str]]:
    """Stops without the tokens that separate a reasoning section from the answer, plus the tokens that end
    an answer given after reasoning (gpt-oss: `<|end|>` ends the analysis, `<|return|>` the answer).

    Returns (stops, dropped). Templates that do not render a reasoning field leave `stops` as they are.
    """
    think = "QxTHINKxQ"
    messages = [*_markers("u1"), {**_markers("a1")[0], "reasoning_content": think}]
    try:
        text = r(messages, False)
    except _RenderRejected:
        return stops, []
    a1 = _MK["a1"]
    if text.count(think) != 1 or text.count(a1) != 1 or text.index(think) > text.index(a1):
        return stops, []
    between = set(_specials_in(text[text.index(think) + len(think):text.index(a1)], specials))
    ends = [t for t in _specials_in(text[text.index(a1) + len(a1):], specials) if t not in between]
    dropped = [t for t in stops if t in between]
    kept = [t for t in stops if t not in between]
    return list(dict.fromkeys([*ends, *kept])), dropped


def _stops(parts: _Parts, eos: str | None, specials: Sequence[str]) -> list[str]:
    """End-of-turn token(s), the special tokens that open a turn, and eos (deduplicated, in that order)."""
    found: list[str] = []
    end = parts.post["assistant"]
    found += _specials_in(end, specials) or ([end.strip()] if end.strip() else [])
    for role in ("user", "assistant", "system"):
        pre = parts.pre.get(role, "").lstrip()
        lead = _leading_special(pre, specials)
        if lead:
            found.append(lead)
        elif role == "user" and pre.strip():
            found.append(pre.strip().splitlines()[0])
    if eos:
        found.append(eos)
    return list(dict.fromkeys(s for s in found if s))


def _specials_in(text: str, specials: Sequence[str]) -> list[str]:
    hits = []
    pos = 0
    while pos < len(text):
        tok = next((s for s in specials if text.startswith(s, pos)), None)
        if tok is None:
            m = _SPECIAL_RE.match(text, pos)
            tok = m.group() if m else None
        if tok:
            hits.append(tok)
            pos += len(tok)
        else:
            pos += 1
    return hits


def _leading_special(text: str, specials: Sequence[str]) -> str | None:
    tok = next((s for s in specials if text.startswith(s)), None)
    if tok:
        return tok
    m = _SPECIAL_RE.match(text)
    return m.group() if m else None


def _adds_bos(tokenizer: Any) -> bool:
    """Whether tokenizing adds BOS (what llama.cpp will do too, from the GGUF's add_bos_token)."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return False
    try:
        ids = tokenizer("x").input_ids
    except Exception:  # a tokenizer that cannot encode plain text has bigger problems; assume no BOS
        return False
    return bool(ids) and ids[0] == bos_id


def _tokenizer_specials(tokenizer: Any) -> list[str]:
    names = set(getattr(tokenizer, "all_special_tokens", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    names.update(t.content for t in decoder.values() if getattr(t, "content", None))
    return sorted(names)


# =========================================================================== Modelfile


def render_modelfile(from_: str, adapter: str | None, template: str, stop: list[str],
                     system: str | None = None, parameters: dict[str, Any] | None = None) -> str:
    """An Ollama Modelfile: FROM, ADAPTER, TEMPLATE, SYSTEM, one PARAMETER line per value (stop first)."""
    if not from_.strip():
        raise ExportError("Modelfile FROM must not be empty")
    lines = [f"FROM {from_}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    lines.append(f"TEMPLATE {_quote(template)}")
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    for s in stop:
        lines.append(f"PARAMETER stop {_param_value(s)}")
    for key, value in (parameters or {}).items():
        if key == "stop":
            raise ExportError("pass stop tokens as `stop`, not in `parameters`")
        for v in value if isinstance(value, (list, tuple)) else [value]:
            lines.append(f"PARAMETER {key} {_param_value(v)}")
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    """Modelfile string: triple quotes (multi-line, verbatim) unless the text itself contains them."""
    if '"""' not in text:
        return f'"""{text}"""'
    return json.dumps(text, ensure_ascii=False)


def _param_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(str(value), ensure_ascii=False)
