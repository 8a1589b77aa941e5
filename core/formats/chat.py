"""`chat`: `{"messages": [{"role": ..., "content": ...}, ...]}`, OpenAI fine-tuning style."""

from __future__ import annotations

from typing import Any

from core.formats.base import ROLES, Example, Format, RowProblem, conversation


class Chat(Format):
    name = "chat"
    line = '`{"messages": [{"role": "system"\\|"user"\\|"assistant"\\|"tool", "content": str}, ...]}` (OpenAI style)'
    loss_on = "assistant turns"

    def detect(self, first: Any) -> bool:
        return isinstance(first, dict) and "messages" in first

    def check(self, obj: dict[str, Any]) -> Example:
        messages = obj.get("messages")
        if not isinstance(messages, list):
            raise RowProblem("'messages' must be a non-empty list")
        turns: list[tuple[str, str]] = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise RowProblem(f"messages[{i}] must be an object")
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise RowProblem(f"messages[{i}].role must be one of {sorted(ROLES)}, got {role!r}")
            if not isinstance(content, str):
                raise RowProblem(f"messages[{i}].content must be a string")
            turns.append((role, content))
        return conversation(turns, "messages")


FORMAT = Chat()
