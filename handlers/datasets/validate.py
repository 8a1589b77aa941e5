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

from events.payloads import DatasetFormat, DatasetProfile, LineError, LintWarning

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


@dataclass
class RowInfo:
    """What profiling and lint need from one valid row."""

    chars: int
    roles: Counter[str] = field(default_factory=Counter)
    key: str = ""  # canonical text: equal keys are exact duplicates
    empty_turns: int = 0  # assistant turns with no content
    trainable: bool = True  # there is assistant (or plain) text to learn from


def _canonical(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def check_text(line: str) -> RowInfo:
    return RowInfo(len(line), key=line)


def check_alpaca(line: str) -> RowInfo:
    obj = json_object(line)
    chars = sum(len(str_field(obj, k, required=k == "instruction")) for k in ("instruction", "input", "output"))
    if "output" not in obj:
        raise LineProblem("missing required key 'output'")
    return RowInfo(chars, key=_canonical(obj), trainable=bool(obj["output"].strip()))


def check_chat(line: str) -> RowInfo:
    obj = json_object(line)
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise LineProblem("'messages' must be a non-empty list")
    roles: Counter[str] = Counter()
    chars = empty = 0
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
            empty += 1
        roles[role] += 1
        chars += len(content)
    if not roles["assistant"]:
        raise LineProblem("no assistant message: nothing to learn from this example")
    return RowInfo(chars, roles, _canonical(obj), empty, trainable=empty < roles["assistant"])


MAX_WARNING_LINES = 20


def lint_warning(code: str, lines: list[int], message: str) -> LintWarning | None:
    """A warning for `lines` (None when there are none); `{n}` in `message` becomes their count."""
    if not lines:
        return None
    return LintWarning(code=code, count=len(lines), message=message.format(n=len(lines)),
                       lines=lines[:MAX_WARNING_LINES])


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
        if self.ok and self.profile is not None:
            return f"{self.profile.rows} rows"
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
    _seen: set[bytes] = field(default_factory=set)
    _dups: list[int] = field(default_factory=list)
    _empty_turns: list[int] = field(default_factory=list)
    _untrainable: list[int] = field(default_factory=list)
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
            info = CHECKERS[self._fmt](line)  # type: ignore[index]
        except LineProblem as e:
            self._error(str(e))
            return
        self._lines += 1
        self._sizes.append(info.chars)
        self._roles.update(info.roles)
        digest = hashlib.blake2b(info.key.encode(), digest_size=16).digest()
        if digest in self._seen:
            self._dups.append(self._line_no)
        self._seen.add(digest)
        if not info.trainable:
            self._untrainable.append(self._line_no)
        elif info.empty_turns:
            self._empty_turns.append(self._line_no)

    def _error(self, message: str) -> None:
        self._lines += 1
        self._invalid += 1
        if len(self._errors) < self.max_errors:
            self._errors.append(LineError(line=self._line_no, message=message))

    def warnings(self) -> list[LintWarning]:
        found = [
            lint_warning("duplicate_rows", self._dups, "{n} row(s) repeat an earlier row exactly: they weigh "
                         "more in training and can land in both the training and the validation split"),
            lint_warning("no_trainable_tokens", self._untrainable, "{n} row(s) have no assistant text to learn "
                         "from (every assistant turn or output is empty): training skips them"),
            lint_warning("empty_assistant_turns", self._empty_turns, "{n} row(s) have an empty assistant turn: "
                         "the model learns to answer those prompts with nothing"),
        ]
        return [w for w in found if w is not None]

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
                warnings=self.warnings(),
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
