"""Parse an Ollama Modelfile (FROM, ADAPTER, TEMPLATE, SYSTEM, PARAMETER) into `ollama.create` arguments.

Follows Ollama's documented syntax: one instruction per line, case-insensitive keywords, values optionally
in double quotes or triple quotes (which may span lines), `#` comments.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from typing import Any

from core.errors import InvalidInputError

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


def parse(text: str) -> Modelfile:
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
