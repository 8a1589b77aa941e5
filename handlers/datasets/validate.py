"""Dataset validation and profiling: pure functions over a stream of byte chunks.

The formats (detected from the first non-blank line unless the upload names one) and their row checks
are the registry's (`core/formats/`, one module per format); this module streams the lines through it,
collects line errors and profiles the valid rows.

Every line is checked; up to `max_errors` line errors are reported with 1-based line numbers, the way
OpenAI's training-file validation reports them.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import AsyncIterable, Iterable
from dataclasses import dataclass, field
from typing import Any

from core import formats
from events.payloads import DatasetFormat, DatasetProfile, LineError, LintWarning


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
    _fmt: formats.Format | None = None
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
        try:
            line = formats.read_line(raw)
            if line is None:
                return
            if self._fmt is None:
                self._fmt = formats.detect(line) if self.format == "auto" else formats.get(self.format)
            ex = self._fmt.parse(line)
        except formats.RowProblem as e:
            self._error(str(e))
            return
        self._lines += 1
        self._sizes.append(ex.chars)
        self._roles.update(ex.roles)
        digest = hashlib.blake2b(ex.key.encode(), digest_size=16).digest()
        if digest in self._seen:
            self._dups.append(self._line_no)
        self._seen.add(digest)
        if not ex.trainable:
            self._untrainable.append(self._line_no)
        elif ex.empty_answers:
            self._empty_turns.append(self._line_no)

    def _error(self, message: str) -> None:
        self._lines += 1
        self._invalid += 1
        if len(self._errors) < self.max_errors:
            self._errors.append(LineError(line=self._line_no, message=message))

    def warnings(self) -> list[LintWarning]:
        found = [
            LintWarning.of("duplicate_rows", self._dups, "{n} row(s) repeat an earlier row exactly: they weigh "
                           "more in training and can land in both the training and the validation split"),
            LintWarning.of("no_trainable_tokens", self._untrainable, "{n} row(s) have no assistant text to learn "
                           "from (every assistant turn or output is empty): training skips them"),
            LintWarning.of("empty_assistant_turns", self._empty_turns, "{n} row(s) have an empty assistant turn: "
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
                format=self._fmt.name, rows=valid, bytes=self._bytes, chars=chars,
                tokens_estimate=(chars + 3) // 4, min_chars=min(self._sizes), max_chars=max(self._sizes),
                mean_chars=round(chars / valid, 2), roles=dict(self._roles), sha256=self._sha.hexdigest(),
                warnings=self.warnings(),
            )
        return Report(self._fmt.name if self._fmt else None, profile, self._errors, self._invalid, self._lines)


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
