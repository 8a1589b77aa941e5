"""The bridge's trust rules as plain functions (no stack): the webhook secret parsed at startup, the
access log without query strings, and the Go-template interpreter exposing only the template's fields."""

from __future__ import annotations

import base64
import logging

import pytest
from pydantic import SecretStr

from core.settings import Settings
from handlers.bridge.__main__ import PathWithoutQuery
from handlers.bridge.app import BridgeConfigError, create_app
from handlers.bridge.signatures import sign_standard, standard_key, verify
from handlers.ollama_format.gotemplate import GoTemplate, TemplateError

NOW = 1_700_000_000
BODY = b'{"job_id": "job-123"}'


def test_an_unpadded_whsec_secret_is_accepted_like_the_reference_library() -> None:
    key = b"codetune-key-1234"  # 17 bytes: base64 ends in "="
    padded = "whsec_" + base64.b64encode(key).decode()
    unpadded = padded.rstrip("=")
    assert unpadded != padded and standard_key(unpadded) == standard_key(padded) == key
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(NOW),
               "webhook-signature": sign_standard(padded, "msg_1", NOW, BODY)}
    assert verify(headers, BODY, unpadded, 300, now=NOW) == "msg_1"


@pytest.mark.parametrize("bad", ["whsec_not*base64!", "whsec_abcde", "whsec_"])
def test_a_bad_webhook_secret_refuses_to_start_naming_the_setting_not_the_secret(bad: str) -> None:
    with pytest.raises(BridgeConfigError) as e:
        create_app(Settings(webhook_secret=SecretStr(bad)))
    assert "CODETUNE_WEBHOOK_SECRET" in str(e.value)
    assert bad.removeprefix("whsec_") not in str(e.value) or bad == "whsec_"


def test_good_secrets_create_the_app() -> None:
    create_app(Settings(webhook_secret=SecretStr("a raw secret")))
    create_app(Settings(webhook_secret=SecretStr("whsec_" + base64.b64encode(b"k" * 24).decode())))


def test_the_access_log_line_has_no_query_string() -> None:
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "GET", "/api/v1/tuning/?token=s3cret&x=1", "1.1", 401), None)
    assert PathWithoutQuery().filter(record)
    line = record.getMessage()
    assert "s3cret" not in line and "?" not in line and '"GET /api/v1/tuning/ HTTP/1.1" 401' in line


@pytest.mark.parametrize("source", [
    "{{ range .Messages }}{{ .Content.__class__.__mro__ }}{{ end }}",
    "{{ .System.__class__ }}",
    "{{ range .Messages }}{{ .Content.upper }}{{ end }}",
    "{{ with .Messages }}{{ .__len__ }}{{ end }}",
])
def test_templates_cannot_reach_python_internals(source: str) -> None:
    t = GoTemplate(source)
    try:
        out = t.render_chat([{"role": "user", "content": "hi"}], system="sys")
    except TemplateError as e:
        assert "can't evaluate field" in str(e)
    else:
        assert "class" not in out and "object" not in out and "method" not in out


def test_documented_template_fields_still_render() -> None:
    t = GoTemplate("{{ if .System }}S:{{ .System }}|{{ end }}{{ range $i, $m := .Messages }}"
                   "{{ if eq .Role \"user\" }}U:{{ .Content }}{{ else }}A:{{ $m.Content }}{{ end }}|{{ end }}")
    out = t.render_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], system="sys")
    assert out == "S:sys|A:sys|U:hi|A:yo|"  # the system message is in .Messages too, as in Ollama
    assert GoTemplate("{{ .System }} {{ .Prompt }}").render_chat([{"role": "user", "content": "q"}], "s") == "s q"
