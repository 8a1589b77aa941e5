"""Ollama's TEMPLATE language: an interpreter of the Go text/template subset that Ollama templates use.

Supported (what Ollama's stock templates and the templates CodeTune emits need): text; `{{ pipeline }}`; trim
markers `{{- -}}`; comments; if / else if / else / end; range (with `$i, $v :=`, else, break, continue);
with / else; variables (`:=`, `=`, `$`); fields (`.A.B`, `$x.A`, `(expr).A`); string/number/bool/nil
literals; pipes `|`; the functions in `gotemplate_funcs` (Go's builtins plus Ollama's `json`). Not supported:
define / template / block (a TemplateError), and Go methods on values: the data is plain dicts (Ollama's
documented fields: `.System`, `.Prompt`, `.Response`, `.Messages` with `.Role`/`.Content`, `.Tools`, …).
Ollama parses with `missingkey=zero`: an absent field is nil (`<no value>` when printed).

`GoTemplate.render_chat` builds the prompt the way Ollama's /api/chat does: the Modelfile SYSTEM prepended as
a system message unless the chat starts with one, consecutive same-role messages collated (`collate`), then
`.Messages` rendering, or for templates that only know `.Prompt`/`.Response` Ollama's legacy turn-by-turn
rendering. tests/unit/test_gotemplate_ollama.py checks it against Ollama's own template test data.

Used by the export stage (to verify an emitted TEMPLATE) and by the Ollama stand-in (to render prompts).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from handlers.ollama_format.gotemplate_funcs import FUNCS, TemplateError, go_str, go_type, truth
from handlers.ollama_format.gotemplate_parse import (
    Action,
    Break,
    BreakNode,
    Continue,
    ContinueNode,
    If,
    Operand,
    Pipe,
    Range,
    Text,
    With,
    parse,
)


class _Exec:
    def __init__(self, root: Any) -> None:
        self.root = root
        self.scopes: list[dict[str, Any]] = [{"$": root}]
        self.out: list[str] = []

    def run(self, nodes: list[Any], dot: Any) -> None:
        for node in nodes:
            self._node(node, dot)

    def _node(self, node: Any, dot: Any) -> None:
        if isinstance(node, Text):
            self.out.append(node.text)
        elif isinstance(node, Action):
            value = self._pipe(node.pipe, dot)
            if not node.pipe.decl:
                self.out.append(go_str(value))
        elif isinstance(node, If):
            self._if(node, dot)
        elif isinstance(node, With):
            self._with(node, dot)
        elif isinstance(node, Range):
            self._range(node, dot)
        elif isinstance(node, BreakNode):
            raise Break
        elif isinstance(node, ContinueNode):
            raise Continue

    def _scoped(self, nodes: list[Any], dot: Any, bind: dict[str, Any] | None = None) -> None:
        self.scopes.append(dict(bind or {}))
        try:
            self.run(nodes, dot)
        finally:
            self.scopes.pop()

    def _if(self, node: If, dot: Any) -> None:
        for pipe, body in node.branches:
            if truth(self._pipe(pipe, dot)):
                self._scoped(body, dot)
                return
        if node.else_ is not None:
            self._scoped(node.else_, dot)

    def _with(self, node: With, dot: Any) -> None:
        for pipe, body in node.branches:
            value = self._pipe(pipe, dot)
            if truth(value):
                self._scoped(body, value)
                return
        if node.else_ is not None:
            self._scoped(node.else_, dot)

    def _range(self, node: Range, dot: Any) -> None:
        value = self._pipe(Pipe(cmds=node.pipe.cmds), dot)
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
            except Continue:
                continue
            except Break:
                break

    def _pipe(self, pipe: Pipe, dot: Any) -> Any:
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

    def _command(self, cmd: list[Operand], dot: Any, piped: Any) -> Any:
        head = cmd[0]
        if head.kind == "ident":
            if head.value in ("and", "or"):
                return self._logic(head.value, cmd[1:], dot, piped)
            args = [self._operand(op, dot) for op in cmd[1:]]
            if piped is not _MISSING:
                args.append(piped)
            try:
                return FUNCS[head.value](*args)
            except TemplateError:
                raise
            except (TypeError, ValueError) as e:
                raise TemplateError(f"error calling {head.value}: {e}") from e
        if len(cmd) > 1 or piped is not _MISSING:
            raise TemplateError("can't give argument to non-function")
        return self._operand(head, dot)

    def _logic(self, name: str, ops: list[Operand], dot: Any, piped: Any) -> Any:
        thunks: list[Callable[[], Any]] = [functools.partial(self._operand, op, dot) for op in ops]
        if piped is not _MISSING:
            thunks.append(lambda: piped)
        if not thunks:
            raise TemplateError(f"wrong number of args for {name}: want at least 1 got 0")
        value: Any = None
        for thunk in thunks:
            value = thunk()
            if truth(value) != (name == "and"):
                return value
        return value

    def _operand(self, op: Operand, dot: Any) -> Any:
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
            raise TemplateError(f"can't evaluate field {name} in type {go_type(value)}")
    return value


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
        raise TemplateError(f"range can't iterate over {go_str(value)}")



# --------------------------------------------------------------------------- identifiers / legacy cut


def _identifiers(nodes: list[Any]) -> set[str]:
    found: set[str] = set()

    def pipe(p: Pipe) -> None:
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
            if isinstance(n, Action):
                pipe(n.pipe)
            elif isinstance(n, (If, With)):
                for p, body in n.branches:
                    pipe(p)
                    walk(body)
                walk(n.else_)
            elif isinstance(n, Range):
                pipe(n.pipe)
                walk(n.body)
                walk(n.else_)

    walk(nodes)
    return {name.lower() for name in found}


def _mentions_response(p: Pipe) -> bool:
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
            if isinstance(n, Action) and _mentions_response(n.pipe):
                cut = True
            elif isinstance(n, (If, With)):
                n = type(n)([(p, walk(body) or []) for p, body in n.branches], walk(n.else_))
            elif isinstance(n, Range):
                n = Range(n.pipe, walk(n.body) or [], walk(n.else_))
            kept.append(n)
        return kept

    return walk(nodes) or []


# --------------------------------------------------------------------------- public: GoTemplate


class GoTemplate:
    """A parsed Ollama TEMPLATE; `render_chat` applies Ollama's message rules (see the module docstring)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.nodes = parse(source)
        self.vars = _identifiers(self.nodes)
        if "messages" not in self.vars and "response" not in self.vars:
            # Ollama appends {{ .Response }} to templates that mention neither
            self.nodes = [*self.nodes, Action(Pipe(cmds=[[Operand("field", None, ("Response",))]]))]

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
    except (Break, Continue) as e:
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
