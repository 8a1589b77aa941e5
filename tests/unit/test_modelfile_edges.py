"""Edges of the chat template → Ollama TEMPLATE translation, on the chat templates llama.cpp ships.

Each case was found by rendering the generated TEMPLATEs against `apply_chat_template` outside the
normal chats the recovery verifies: today's date, `| trim`, an empty system message, the stop list of
reasoning models, and `printf` widths. Ollama's template functions are Go's text/template builtins plus
`json` (ollama/ollama template/template.go): there is no date and no string function to lean on.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from core.errors import ExportError
from handlers.ollama_format.chat_format import chat_format_from_jinja, pinned_clock
from handlers.ollama_format.gotemplate import GoTemplate
from tests.unit.test_export import converters_dir


@pytest.fixture(scope="module")
def templates() -> Path:
    return converters_dir() / "models" / "templates"


def _hf(jinja: str, messages: list[dict[str, str]], *, gen: bool = True) -> str:
    """What transformers renders, without the BOS that llama.cpp adds itself (as the recovery does)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    texts, _ = render_jinja_template([messages], chat_template=jinja, add_generation_prompt=gen,
                                     bos_token="<s>", eos_token="</s>")
    return texts[0].removeprefix("<s>")


# --------------------------------------------------------------------------- (a) today's date


def test_a_dated_template_carries_the_export_date_and_says_so(templates: Path) -> None:
    jinja = (templates / "meta-llama-Llama-3.2-3B-Instruct.jinja").read_text()
    may = chat_format_from_jinja(jinja, now=datetime(2031, 5, 6, 12))
    june = chat_format_from_jinja(jinja, now=datetime(2031, 6, 7, 12))
    assert "06 May 2031" in may.template and "07 Jun 2031" in june.template
    assert may.template.replace("06 May 2031", "07 Jun 2031") == june.template  # only the date moves
    assert any("current date" in n and "2031-05-06" in n for n in may.notes), may.notes
    chat = [{"role": "user", "content": "Hi"}]
    with pinned_clock(datetime(2031, 5, 6, 12)):
        assert GoTemplate(may.template).render_chat(chat) == _hf(jinja, chat)
    with pinned_clock(datetime(2031, 5, 7, 12)):  # the next day the tokenizer moves on; the TEMPLATE cannot
        assert GoTemplate(may.template).render_chat(chat) != _hf(jinja, chat)


def test_an_undated_template_has_no_date_note(templates: Path) -> None:
    fmt = chat_format_from_jinja((templates / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text())
    assert not any("date" in n for n in fmt.notes)


@pytest.mark.parametrize("name", ["openai-gpt-oss-120b.jinja", "ibm-granite-granite-3.3-2B-Instruct.jinja",
                                  "Mistral-Small-3.2-24B-Instruct-2506.jinja"])
def test_other_dated_templates_are_noticed(templates: Path, name: str) -> None:
    fmt = chat_format_from_jinja((templates / name).read_text(), now=datetime(2031, 5, 6))
    assert "2031" in fmt.template and any("current date" in n for n in fmt.notes), name


# --------------------------------------------------------------------------- (b) | trim


def test_trimmed_content_is_noted_and_trimmed_messages_get_the_trained_prompt(templates: Path) -> None:
    jinja = (templates / "meta-llama-Llama-3.1-8B-Instruct.jinja").read_text()
    fmt = chat_format_from_jinja(jinja)
    assert any("trims whitespace" in n for n in fmt.notes), fmt.notes
    padded = [{"role": "user", "content": "  What is 2+2?\n"}, {"role": "assistant", "content": " 4 "},
              {"role": "user", "content": "\nAnd 3+3? "}]
    stripped = [{**m, "content": m["content"].strip()} for m in padded]
    tmpl = GoTemplate(fmt.template)
    assert tmpl.render_chat(stripped) == _hf(jinja, padded)  # what the note tells users to do works
    assert tmpl.render_chat(padded) != _hf(jinja, padded)  # the documented difference: Go keeps whitespace


def test_a_template_that_keeps_whitespace_has_no_trim_note(templates: Path) -> None:
    fmt = chat_format_from_jinja((templates / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text())
    assert not any("trim" in n for n in fmt.notes)


# --------------------------------------------------------------------------- (c) empty system message


EMPTY_SYSTEM_CHATS = [
    [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
     {"role": "user", "content": "Bye"}],
]


def test_an_empty_system_message_renders_like_the_tokenizer_on_every_template(templates: Path) -> None:
    checked = 0
    for path in sorted(templates.glob("*.jinja")):
        jinja = path.read_text()
        try:
            fmt = chat_format_from_jinja(jinja)
        except ExportError:
            continue
        if fmt.system_mode == "unsupported":
            continue
        tmpl = GoTemplate(fmt.template)
        for chat in EMPTY_SYSTEM_CHATS:
            assert tmpl.render_chat(chat) == _hf(jinja, chat), path.name
        checked += 1
    assert checked >= 55


def test_qwen_gets_one_system_turn_not_its_default_and_an_empty_one(templates: Path) -> None:
    fmt = chat_format_from_jinja((templates / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text())
    prompt = GoTemplate(fmt.template).render_chat(EMPTY_SYSTEM_CHATS[0])
    assert prompt.count("<|im_start|>system") == 1 and "You are Qwen" not in prompt
    default = GoTemplate(fmt.template).render_chat(EMPTY_SYSTEM_CHATS[0][1:])
    assert default.count("<|im_start|>system") == 1 and "You are Qwen" in default


# --------------------------------------------------------------------------- (d) reasoning models' stops


@pytest.mark.parametrize(("name", "dropped", "kept"), [
    ("openai-gpt-oss-120b.jinja", {"<|end|>", "<|start|>"}, "<|return|>"),
    ("Kimi-K3.jinja", {"<|close|>", "<|open|>"}, "<|end_of_msg|>"),
])
def test_tokens_between_reasoning_and_answer_are_not_stops(templates: Path, name: str, dropped: set[str],
                                                           kept: str) -> None:
    fmt = chat_format_from_jinja((templates / name).read_text())
    assert not dropped & set(fmt.stop), fmt.stop
    assert kept in fmt.stop  # the token that really ends an answer stays (or comes in)
    assert any("left" in n and "reasoning" in n for n in fmt.notes), fmt.notes
    reply = _hf((templates / name).read_text(), [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "ANSWER", "reasoning_content": "THINKING"}], gen=False)
    generated = reply[reply.index("THINKING"):]  # what the model writes after its generation prompt
    first_stop = min((generated.find(s) for s in fmt.stop if s in generated), default=-1)
    assert first_stop > generated.index("ANSWER")  # generation stops after the answer, not before it


@pytest.mark.parametrize("name", ["Qwen-Qwen3-0.6B.jinja", "meta-llama-Llama-3.1-8B-Instruct.jinja"])
def test_other_templates_keep_their_stops(templates: Path, name: str) -> None:
    fmt = chat_format_from_jinja((templates / name).read_text())
    end = {"Qwen-Qwen3-0.6B.jinja": "<|im_end|>", "meta-llama-Llama-3.1-8B-Instruct.jinja": "<|eot_id|>"}[name]
    assert fmt.stop[0] == end and not any("stop list" in n for n in fmt.notes)


# --------------------------------------------------------------------------- (e) printf widths


@pytest.mark.parametrize(("source", "expected"), [
    ('{{ printf "%*s|%-*s|" 5 "ab" 4 "c" }}', "   ab|c   |"),
    ('{{ printf "%*s|" -3 "x" }}', "x  |"),
    ('{{ printf "%.*s" 2 "hello" }}', "he"),
    ('{{ printf "%5d|%-4d|%05d|%+d" 42 7 -42 3 }}', "   42|7   |-0042|+3"),
    ('{{ printf "%x %X %#x %o %b %c" 255 255 255 8 5 65 }}', "ff FF 0xff 10 101 A"),
    ('{{ printf "%.2f|%6.1f" 3.14159 2.5 }}', "3.14|   2.5"),
    ('{{ printf "%s %s" "a" }}', "a %!s(MISSING)"),
    ('{{ printf "%d" 1 2 }}', "1%!(EXTRA int=2)"),
    ('{{ printf "%d" "x" }}', "%!d(string=x)"),
    ('{{ printf "%*s" "w" "x" }}', "%!(BADWIDTH)x"),
    ('{{ printf "%q|%v|%t|%%" "a\\"b" 1.5 true }}', '"a\\"b"|1.5|true|%'),
])
def test_printf_widths_and_verbs_as_go_formats_them(source: str, expected: str) -> None:
    assert GoTemplate(source).execute({"Response": ""}) == expected
