"""Ollama Modelfiles: `render_modelfile` writes one (export), `parse_modelfile` reads one into `ollama.create`
arguments (serving).

Follows Ollama's documented syntax: one instruction per line (FROM, ADAPTER, TEMPLATE, SYSTEM, PARAMETER;
LICENSE, MESSAGE and REQUIRES are accepted and ignored), case-insensitive keywords, values optionally in
double quotes or triple quotes (which may span lines), `#` comments. What `render_modelfile` writes,
`parse_modelfile` reads back unchanged.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from typing import Any

from core.errors import ExportError, InvalidInputError


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


# --------------------------------------------------------------------------- parsing

INSTRUCTIONS = {"FROM", "ADAPTER", "TEMPLATE", "SYSTEM", "PARAMETER", "LICENSE", "MESSAGE", "REQUIRES"}


@dataclass
class Modelfile:
    from_: str
    adapter: str | None = None
    template: str | None = None
    system: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


def _value(text: str) -> str:
    text = text.strip()
    if text.startswith('"""') and text.endswith('"""') and len(text) >= 6:
        return text[3:-3]
    if text.startswith('"') and text.endswith('"') and len(text) >= 2:
        return json.loads(text)
    return text


def _param(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_modelfile(text: str) -> Modelfile:
    """The instructions of a Modelfile's text (InvalidInputError naming the line when it is malformed)."""
    entries: list[tuple[str, str, int]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        if keyword.upper() not in INSTRUCTIONS:
            raise InvalidInputError(f"Modelfile line {i}: unknown instruction {keyword!r}")
        start = i
        if rest.strip().startswith('"""') and (rest.count('"""') == 1):
            while i < len(lines) and '"""' not in lines[i]:
                rest += "\n" + lines[i]
                i += 1
            if i == len(lines):
                raise InvalidInputError(f"Modelfile line {start}: unterminated triple quote")
            rest += "\n" + lines[i]
            i += 1
        entries.append((keyword.upper(), rest.strip(), start))
    out: Modelfile | None = None
    params: dict[str, Any] = {}
    fields: dict[str, str] = {}
    for keyword, rest, line_no in entries:
        if keyword == "PARAMETER":
            parts = shlex.split(rest)
            if len(parts) != 2:
                raise InvalidInputError(f"Modelfile line {line_no}: PARAMETER needs a name and a value")
            name, value = parts
            if name == "stop":
                params.setdefault("stop", []).append(value)
            else:
                params[name] = _param(value)
        elif keyword in {"FROM", "ADAPTER", "TEMPLATE", "SYSTEM"}:
            fields[keyword] = _value(rest)
    if "FROM" not in fields:
        raise InvalidInputError("Modelfile has no FROM line")
    out = Modelfile(from_=fields["FROM"], adapter=fields.get("ADAPTER"), template=fields.get("TEMPLATE"),
                    system=fields.get("SYSTEM"), parameters=params)
    return out
