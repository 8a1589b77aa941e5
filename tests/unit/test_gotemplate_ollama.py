"""Our Go-template interpreter (`handlers.ollama_format.gotemplate`) against Ollama's own template tests.

tests/data/ollama_templates.json vendors, from github.com/ollama/ollama (path and commit per entry):
- stock templates `template/<name>.gotmpl` and their expected renderings `template/testdata/<name>.gotmpl/<conv>`,
  which Ollama's `TestTemplate` compares with `Template.Execute(Values{Messages: conv})`;
- the `TestExecuteWithMessages` cases: legacy `.Prompt`/`.Response` templates and `.Messages` templates that
  must render the same prompt for the same chat.

`render_chat(messages)` is our `Execute(Values{Messages})`: collation, then `.Messages` or legacy rendering.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from handlers.ollama_format.gotemplate import GoTemplate, TemplateError

DATA = json.loads((Path(__file__).parents[1] / "data" / "ollama_templates.json").read_text(encoding="utf-8"))
CASES = [(name, conv) for name, t in sorted(DATA["templates"].items()) for conv in t["expected"]]


@pytest.mark.parametrize(("name", "conv"), CASES, ids=[f"{n}/{c}" for n, c in CASES])
def test_stock_templates_render_like_ollamas_testdata(name: str, conv: str) -> None:
    template = DATA["templates"][name]
    got = GoTemplate(template["source"]).render_chat(DATA["conversations"][conv])
    if name in DATA["trailing_space_trimmed"] and got.endswith(" "):
        got = got[:-1]  # TestTemplate trims one trailing space for these templates before comparing
    assert got == template["expected"][conv]["text"]


WITH_MESSAGES = [(case, kind) for case in DATA["execute_with_messages"] for kind in case["templates"]]


@pytest.mark.parametrize(("case", "kind"), WITH_MESSAGES,
                         ids=[f"{c['name']}/{k}" for c, k in WITH_MESSAGES])
def test_legacy_and_messages_templates_render_the_same_chat(case: dict[str, Any], kind: str) -> None:
    """TestExecuteWithMessages: a legacy template is rendered turn by turn (`.System`/`.Prompt`/`.Response`,
    the last turn cut after `.Response`), a `.Messages` one in one go; both give Ollama's expected prompt."""
    assert GoTemplate(case["templates"][kind]).render_chat(case["messages"]) == case["expected"]


def test_suffix_templates_execute_like_ollama() -> None:
    """TestExecuteWithSuffix: a fill-in-the-middle template with and without `.Suffix`."""
    source = "{{- if .Suffix }}<PRE> {{ .Prompt }} <SUF>{{ .Suffix }} <MID>\n{{- else }}{{ .Prompt }}\n{{- end }}"
    t = GoTemplate(source)
    assert t.render_chat([{"role": "user", "content": "hello"}]) == "hello"
    assert t.execute({"Prompt": "def add(", "Suffix": "return x", "Response": ""}) == \
        "<PRE> def add( <SUF>return x <MID>"


def test_where_our_subset_deliberately_differs() -> None:
    """Ollama parses a template calling an undefined function and fails only when execution reaches the call
    (TestParseVars `{{ undefined }}`, TestParseExecute "undefined function"). Ours refuses it when parsing:
    a TEMPLATE is checked once, at export and at create, rather than failing on some later chat."""
    with pytest.raises(TemplateError, match='function "undefined" not defined'):
        GoTemplate("{{- if .Suffix }}{{ .Prompt }} {{ .Suffix }}{{- else }}{{ undefined }}{{- end }}")


def test_the_stock_templates_we_emit_are_ollamas() -> None:
    """The TEMPLATE export emits for a recognised family is Ollama's stock text for it, verbatim."""
    from handlers.ollama_format.chat_format import STOCK_TEMPLATES

    ours = {"chatml": "chatml", "llama3": "llama3-instruct", "phi3": "phi-3", "mistral": "mistral-instruct"}
    assert {fam: STOCK_TEMPLATES[fam] for fam in ours} == {
        fam: DATA["templates"][name]["source"] for fam, name in ours.items()}
