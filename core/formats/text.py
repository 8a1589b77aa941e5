"""`text`: one training example per line, plain text (the original CodeTune format)."""

from __future__ import annotations

from typing import Any

from core.formats.base import Example, Format


class Text(Format):
    name = "text"
    line = "a training example (plain text; the original CodeTune format)"
    loss_on = "every token"
    fallback = True  # a file no other format claims is plain text

    def detect(self, first: Any) -> bool:
        return True

    def parse(self, line: str) -> Example:
        return Example(text=line, chars=len(line), key=line)


FORMAT = Text()
