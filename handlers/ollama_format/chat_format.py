"""Tokenizer chat template (jinja) → Ollama TEMPLATE (Go text/template) + stop tokens.

Why: a fine-tune only answers well with the prompt format it was trained on, and only stops when its
end-of-turn token is a stop parameter (the seed's generic template is why fine-tunes "never stopped").

How (`recover_chat_format`):
1. Render the jinja template (transformers' `apply_chat_template`) on marker conversations and split the
   text at the markers: per-role prefix/suffix strings, the generation prompt, any preamble emitted when
   there is no system message (e.g. a default system prompt), and how system messages are placed (own turn,
   merged into the first/last user turn, or rejected by the template) — `chat_parts`.
2. Emit a Go template over `.Messages` / `.Role` / `.Content` / `.System` that produces the same text.
3. Verify: render the emitted template with `gotemplate.GoTemplate` (Ollama's rules: Modelfile SYSTEM
   prepended as a system message, consecutive same-role messages collated) on 1- to 3-turn conversations
   with and without a system message, and compare with `apply_chat_template`. Any mismatch raises
   `ExportError`: never a wrong template.
4. Known families (chatml, llama3, phi3, zephyr, mistral, gemma) are recognised from their markers as a
   sanity check (their end-of-turn token must be what was recovered); where Ollama's stock template for
   the family reproduces the tokenizer's text exactly, that stock text is emitted.

A leading BOS token is left out of the TEMPLATE when the tokenizer adds it itself: llama.cpp (and Ollama)
add BOS when tokenizing, so keeping it would double it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from core.errors import ExportError
from handlers.ollama_format.chat_parts import (
    EMPTY_SYSTEM_MODES,
    MARKERS,
    SPECIAL_RE,
    Message,
    Parts,
    Renderer,
    RenderFn,
    RenderRejected,
    emit_template,
    markers,
    recover_parts,
    verify,
)

log = logging.getLogger("codetune.export")

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



@dataclass(frozen=True)
class ChatFormat:
    """What was recovered from a chat template, and the Ollama TEMPLATE + stop list made from it."""

    template: str
    stop: list[str]
    family: str | None  # recognised family (sanity-checked), None for an unknown format
    stock: bool  # True when `template` is Ollama's stock text for `family`
    system_mode: str  # turn | merged_first | merged_last | unsupported
    notes: tuple[str, ...] = ()


def recover_chat_format(render: RenderFn, *, bos_token: str | None = None, eos_token: str | None = None,
                        add_bos: bool = True, special_tokens: Iterable[str] = (),
                        now: datetime | None = None) -> ChatFormat:
    """Recover an Ollama TEMPLATE + stop list from `render` (a chat-template renderer); see module doc.

    `now`: the instant every render sees as the current time (default: the time of the call), so a chat
    template that prints today's date renders the same date throughout recovery and verification.
    """
    specials = sorted({t for t in special_tokens if t}, key=len, reverse=True)
    r = Renderer(render, bos_token if add_bos else None)
    now = now or datetime.now()
    with pinned_clock(now):
        parts = recover_parts(r)
        full = r(markers("u1", "a1", "u2"), True)
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
            problem = verify(text, r, check_system=parts.system_mode != "unsupported")
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



def _recognise(full: str, parts: Parts) -> str | None:
    for fam in FAMILIES:
        if all(m in full for m in (*fam.markers, fam.end_of_turn)):
            if fam.end_of_turn not in parts.post["assistant"]:
                raise ExportError(f"the chat template looks like {fam.name} but an assistant turn ends with "
                                  f"{parts.post['assistant']!r}, not {fam.end_of_turn!r}")
            return fam.name
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


def _edge_notes(r: Renderer, now: datetime) -> list[str]:
    """What the TEMPLATE cannot do like the chat template, said once at export (Ollama's template
    functions are Go's text/template builtins plus `json`: no clock and no string functions)."""
    notes: list[str] = []
    convs = []
    for keys in (("u1", "a1", "u2"), ("s", "u1", "a1", "u2")):
        with contextlib.suppress(RenderRejected):
            convs.append((markers(*keys), r(markers(*keys), True)))
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
    except RenderRejected:
        return notes
    trimmed = [m["content"].strip() for m in padded if m["content"] not in text and m["content"].strip() in text]
    if trimmed:
        notes.append("the chat template trims whitespace around message contents; Ollama templates have no "
                     "string functions, so the TEMPLATE keeps it: send messages without leading or trailing "
                     "whitespace to get the prompt the model was trained on")
    return notes


def _reasoning_safe_stops(r: Renderer, stops: list[str], specials: Sequence[str]) -> tuple[list[str], list[str]]:
    """Stops without the tokens that separate a reasoning section from the answer, plus the tokens that end
    an answer given after reasoning (gpt-oss: `<|end|>` ends the analysis, `<|return|>` the answer).

    Returns (stops, dropped). Templates that do not render a reasoning field leave `stops` as they are.
    """
    think = "QxTHINKxQ"
    messages = [*markers("u1"), {**markers("a1")[0], "reasoning_content": think}]
    try:
        text = r(messages, False)
    except RenderRejected:
        return stops, []
    a1 = MARKERS["a1"]
    if text.count(think) != 1 or text.count(a1) != 1 or text.index(think) > text.index(a1):
        return stops, []
    between = set(_specials_in(text[text.index(think) + len(think):text.index(a1)], specials))
    ends = [t for t in _specials_in(text[text.index(a1) + len(a1):], specials) if t not in between]
    dropped = [t for t in stops if t in between]
    kept = [t for t in stops if t not in between]
    return list(dict.fromkeys([*ends, *kept])), dropped


def _stops(parts: Parts, eos: str | None, specials: Sequence[str]) -> list[str]:
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
            m = SPECIAL_RE.match(text, pos)
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
    m = SPECIAL_RE.match(text)
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

