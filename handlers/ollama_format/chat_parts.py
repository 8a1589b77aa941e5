"""How a chat template is taken apart: render it on marker conversations, split the text at the markers into
per-role prefixes/suffixes (`Parts`), emit a Go template from them (`emit_template`) and check that template
against the chat template (`verify`). The public entry point is `chat_format.recover_chat_format`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from core.errors import ExportError
from handlers.ollama_format.gotemplate import GoTemplate
from handlers.ollama_format.gotemplate_funcs import TemplateError

Message = dict[str, str]
RenderFn = Callable[[list[Message], bool], str]  # (messages, add_generation_prompt) -> prompt text

SPECIAL_RE = re.compile(r"<\|[^\s<>|]{1,48}\|>|</?[A-Za-z_][A-Za-z0-9_.-]{0,48}>|\[/?[A-Z_]{2,24}\]")

# Marker contents: plain words, so templates that trim or strip content leave them intact.
MARKERS = {"s": "QxSYSxQ", "u1": "QxUSR1xQ", "a1": "QxAST1xQ", "u2": "QxUSR2xQ"}

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


@dataclass
class Parts:
    pre: dict[str, str]
    post: dict[str, str]
    head: str  # emitted before the first message when there is no system message
    gen: str  # generation prompt
    system_mode: str
    sep: str = "\n\n"  # system/user separator in the merged modes
    empty_system: str | None = None  # text before the first user turn when the system message is empty



class Renderer:
    def __init__(self, render: RenderFn, strip_bos: str | None) -> None:
        self.render = render
        self.strip_bos = strip_bos

    def __call__(self, messages: list[Message], gen: bool) -> str:
        try:
            text = self.render(messages, gen)
        except Exception as e:  # jinja raise_exception → TemplateError, etc.
            raise RenderRejected(str(e)) from e
        if self.strip_bos and text.startswith(self.strip_bos):
            text = text[len(self.strip_bos):]
        return text


class RenderRejected(Exception):
    pass


def markers(*keys: str) -> list[Message]:
    role = {"s": "system", "u": "user", "a": "assistant"}
    return [{"role": role[k[0]], "content": MARKERS[k]} for k in keys]


def split(text: str, keys: Sequence[str]) -> list[str]:
    """Text around the markers of `keys`, which must each occur once, in this order."""
    out, pos = [], 0
    for k in keys:
        i = text.find(MARKERS[k], pos)
        if i < 0 or text.count(MARKERS[k]) != 1:
            raise ExportError(f"the chat template does not render message contents verbatim and in order "
                              f"(marker for {k!r} not found once in {text!r})")
        out.append(text[pos:i])
        pos = i + len(MARKERS[k])
    out.append(text[pos:])
    return out


def _render_split(r: Renderer, keys: Sequence[str], gen: bool) -> list[str]:
    try:
        return split(r(markers(*keys), gen), keys)
    except RenderRejected as e:
        raise ExportError(f"the chat template failed on a {'/'.join(keys)} conversation: {e}") from e


def recover_parts(r: Renderer) -> Parts:
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
    parts = Parts(pre={"user": pre_u, "assistant": pre_a}, post={"user": post_u, "assistant": post_a},
                   head=head_u[:len(head_u) - len(pre_u)], gen=gen, system_mode="turn")
    _recover_system(r, parts)
    return parts


def _recover_system(r: Renderer, parts: Parts) -> None:
    pre_u = parts.pre["user"]
    try:
        text = r(markers("s", "u1"), True)
        long = r(markers("s", "u1", "a1", "u2"), True)
    except RenderRejected:
        parts.system_mode = "unsupported"
        return
    with contextlib.suppress(RenderRejected, ExportError):
        before, _ = split(r([{"role": "system", "content": ""}, *markers("u1")], True), ["u1"])
        if before.endswith(pre_u):
            parts.empty_system = before[:len(before) - len(pre_u)]
    head_s, x_su, _ = split(text, ["s", "u1"])
    if x_su.endswith(pre_u) and not (pre_u and head_s.endswith(pre_u)):
        parts.pre["system"] = head_s
        parts.post["system"] = x_su[:len(x_su) - len(pre_u)]
        return
    order = sorted(["s", "u1", "a1", "u2"], key=lambda k: long.find(MARKERS[k]))
    if order == ["u1", "a1", "s", "u2"]:
        parts.system_mode, parts.sep = "merged_last", split(long, order)[3]
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
        if k == 0 or b[k - 1] == "\n" or b[k - 1] == ">" or SPECIAL_RE.match(b, k):
            return a[:k]
    return a[:0]


def _strip_prefix(text: str, prefix: str, what: str, label: str) -> str:
    if not text.startswith(prefix):
        raise ExportError(f"inconsistent {what}: {text!r} does not start with the {label} {prefix!r}")
    return text[len(prefix):]



def _lit(text: str) -> str:
    """Literal text for a Go template ('{{' cannot appear raw)."""
    return text.replace("{{", '{{ "{{" }}')


def _uniform(parts: Parts, roles: Sequence[str]) -> tuple[str, str] | None:
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
# - literal: it renders some other text (recovered as `Parts.empty_system`), which the TEMPLATE emits.
_FIRST_IS_SYSTEM = '(eq (index $.Messages 0).Role "system")'


def emit_template(parts: Parts, empty_system: str = "absent") -> str:
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


def verify(template: str, r: Renderer, *, check_system: bool) -> str | None:
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
        except RenderRejected as e:
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

