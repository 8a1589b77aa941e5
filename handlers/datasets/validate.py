"""Dataset validation and profiling: pure functions over a stream of byte chunks.

Formats (detected from the first non-blank line unless the upload names one):
- `text`:   one training example per line (the seed's format);
- `alpaca`: JSONL `{"instruction": str, "input": str?, "output": str}`;
- `chat`:   JSONL `{"messages": [{"role": ..., "content": ...}, ...]}` (OpenAI fine-tuning style).

Every line is checked; up to `max_errors` line errors are reported with 1-based line numbers, the way
OpenAI's training-file validation reports them.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import AsyncIterable, Iterable
from dataclasses import dataclass, field
from typing import Any

from events.payloads import DatasetFormat, DatasetProfile, LineError

CHAT_ROLES = {"system", "user", "assistant", "tool"}
MAX_LINE_CHARS = 1_000_000


class LineProblem(ValueError):
    pass


def str_field(obj: dict[str, Any], name: str, *, required: bool) -> str:
    if name not in obj:
        if required:
            raise LineProblem(f"missing required key '{name}'")
        return ""
    value = obj[name]
    if not isinstance(value, str):
        raise LineProblem(f"'{name}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise LineProblem(f"'{name}' is empty")
    return value


def json_object(line: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise LineProblem(f"invalid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise LineProblem(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def check_text(line: str) -> tuple[int, Counter[str]]:
    return len(line), Counter()


def check_alpaca(line: str) -> tuple[int, Counter[str]]:
    obj = json_object(line)
    chars = sum(len(str_field(obj, k, required=k != "input")) for k in ("instruction", "input", "output"))
    return chars, Counter()


def check_chat(line: str) -> tuple[int, Counter[str]]:
    obj = json_object(line)
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise LineProblem("'messages' must be a non-empty list")
    roles: Counter[str] = Counter()
    chars = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise LineProblem(f"messages[{i}] must be an object")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise LineProblem(f"messages[{i}].role must be one of {sorted(CHAT_ROLES)}, got {role!r}")
        if role == "system" and i != 0:
            raise LineProblem(f"messages[{i}]: a system message may only come first")
        content = m.get("content")
        if not isinstance(content, str):
            raise LineProblem(f"messages[{i}].content must be a string")
        if role == "assistant" and not content.strip():
            raise LineProblem(f"messages[{i}]: assistant content is empty")
        roles[role] += 1
        chars += len(content)
    if not roles["assistant"]:
        raise LineProblem("no assistant message: nothing to learn from this example")
    return chars, roles


CHECKERS = {"text": check_text, "alpaca": check_alpaca, "chat": check_chat}


def detect_format(first_line: str) -> DatasetFormat:
    stripped = first_line.lstrip()
    if not stripped.startswith("{"):
        return "text"
    try:
        obj = json.loads(stripped)
    except json.JSONDecodeError:
        return "text"
    if isinstance(obj, dict) and "messages" in obj:
        return "chat"
    if isinstance(obj, dict) and ("instruction" in obj or "output" in obj):
        return "alpaca"
    return "text"


@dataclass
class Report:
    format: DatasetFormat | None
    profile: DatasetProfile | None
    line_errors: list[LineError]
    invalid_lines: int
    total_lines: int

    @property
    def ok(self) -> bool:
        return self.profile is not None and self.invalid_lines == 0

    @property
    def summary(self) -> str:
        if self.ok:
            return f"{self.profile.rows} rows"  # type: ignore[union-attr]
        if self.total_lines == 0 or (self.profile is None and not self.invalid_lines):
            return "dataset is empty: no non-blank lines"
        first = self.line_errors[0]
        return (f"{self.invalid_lines} of {self.total_lines} lines are invalid ({self.format} format); "
                f"first: line {first.line}: {first.message}")


@dataclass
class DatasetValidator:
    """Feed it byte chunks; it splits lines, checks each one and profiles the valid rows."""

    format: str = "auto"
    max_errors: int = 20
    _fmt: DatasetFormat | None = None
    _buf: bytes = b""
    _line_no: int = 0
    _lines: int = 0
    _invalid: int = 0
    _errors: list[LineError] = field(default_factory=list)
    _sizes: list[int] = field(default_factory=list)
    _roles: Counter[str] = field(default_factory=Counter)
    _bytes: int = 0
    _sha: Any = field(default_factory=hashlib.sha256)

    def feed(self, chunk: bytes) -> None:
        self._bytes += len(chunk)
        self._sha.update(chunk)
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        for raw in lines:
            self._line(raw)

    def _line(self, raw: bytes) -> None:
        self._line_no += 1
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self._error(f"not valid UTF-8 at byte {e.start}")
            return
        if not line.strip():
            return
        if self._fmt is None:
            self._fmt = detect_format(line) if self.format == "auto" else self.format  # type: ignore[assignment]
        if len(line) > MAX_LINE_CHARS:
            self._error(f"line is longer than {MAX_LINE_CHARS} characters")
            return
        try:
            chars, roles = CHECKERS[self._fmt](line)  # type: ignore[index]
        except LineProblem as e:
            self._error(str(e))
            return
        self._lines += 1
        self._sizes.append(chars)
        self._roles.update(roles)

    def _error(self, message: str) -> None:
        self._lines += 1
        self._invalid += 1
        if len(self._errors) < self.max_errors:
            self._errors.append(LineError(line=self._line_no, message=message))

    def finish(self) -> Report:
        if self._buf:
            buf, self._buf = self._buf, b""
            self._line(buf)
        profile = None
        valid = len(self._sizes)
        if valid and self._fmt:
            chars = sum(self._sizes)
            profile = DatasetProfile(
                format=self._fmt, rows=valid, bytes=self._bytes, chars=chars,
                tokens_estimate=(chars + 3) // 4, min_chars=min(self._sizes), max_chars=max(self._sizes),
                mean_chars=round(chars / valid, 2), roles=dict(self._roles), sha256=self._sha.hexdigest(),
            )
        return Report(self._fmt, profile, self._errors, self._invalid, self._lines)


def validate_bytes(chunks: Iterable[bytes], fmt: str = "auto", max_errors: int = 20) -> Report:
    v = DatasetValidator(format=fmt, max_errors=max_errors)
    for c in chunks:
        v.feed(c)
    return v.finish()


async def validate_stream(chunks: AsyncIterable[bytes], fmt: str = "auto", max_errors: int = 20) -> Report:
    v = DatasetValidator(format=fmt, max_errors=max_errors)
    async for c in chunks:
        v.feed(c)
    return v.finish()
