"""The dataset-format registry: one module per format in this package, found here, listed in one place.

Both the datasets stage (validation and profile) and the tuning stage (training examples) read rows only
through `parse_line`, so a row one accepts the other accepts too. `events.payloads.DatasetFormat` is
derived from `NAMES`.

Adding a format: a module `core/formats/<name>.py` with a `Format` subclass whose `name` is `<name>` and
`FORMAT = ThatClass()`, plus its test. Nothing else lists formats (regenerate the generated files:
`python -m handlers.bridge.asyncapi` and `python -m core.formats --readme`).
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from typing import Any

from core.formats.base import (
    CHATML_TEMPLATE,
    ROLES,
    TRAINED_ROLE,
    Example,
    Format,
    Messages,
    RowProblem,
    UnknownFormatError,
)

__all__ = ["CHATML_TEMPLATE", "FORMATS", "MAX_LINE_CHARS", "NAMES", "ROLES", "TRAINED_ROLE", "Example", "Format",
           "Messages", "RowProblem", "UnknownFormatError", "detect", "get", "parse_line",
           "read_line"]

MAX_LINE_CHARS = 1_000_000
_SUPPORT = {"base"}  # modules of this package that are not formats


def _discover() -> dict[str, Format]:
    found: dict[str, Format] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name in _SUPPORT or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        fmt = getattr(module, "FORMAT", None)
        if not isinstance(fmt, Format):
            raise TypeError(f"{module.__name__} defines no FORMAT (a core.formats.Format instance)")
        if fmt.name != info.name:
            raise TypeError(f"{module.__name__}: FORMAT.name is {fmt.name!r}; a format's module is its name")
        found[fmt.name] = fmt
    fallbacks = [f.name for f in found.values() if f.fallback]
    if len(fallbacks) != 1:
        raise TypeError(f"exactly one dataset format must be the fallback, found {fallbacks}")
    return found


FORMATS: dict[str, Format] = _discover()
NAMES: tuple[str, ...] = tuple(FORMATS)


def get(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise UnknownFormatError(f"unknown dataset format {name!r}; expected one of {list(NAMES)}") from None


def detect(first_line: str) -> Format:
    """The format of a file whose first non-blank line is `first_line`."""
    first: Any = first_line
    stripped = first_line.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            first = json.loads(stripped)
        except json.JSONDecodeError:
            pass
    for fmt in FORMATS.values():
        if not fmt.fallback and fmt.detect(first):
            return fmt
    return next(f for f in FORMATS.values() if f.fallback)


def read_line(raw: bytes) -> str | None:
    """The line rules every format shares: UTF-8, at most `MAX_LINE_CHARS` characters, a trailing CR
    dropped. Returns the line, None for a blank one, or raises `RowProblem`."""
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RowProblem(f"not valid UTF-8 at byte {e.start}") from None
    if not line.strip():
        return None
    if len(line) > MAX_LINE_CHARS:
        raise RowProblem(f"line is longer than {MAX_LINE_CHARS} characters")
    return line


def parse_line(fmt: Format, raw: bytes) -> Example | None:
    """One raw line (its newline removed) → its `Example`; None for a blank line; `RowProblem` otherwise."""
    line = read_line(raw)
    return None if line is None else fmt.parse(line)
