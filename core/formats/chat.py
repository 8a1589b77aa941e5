"""`chat`: `{"messages": [{"role": ..., "content": ...}, ...]}`, OpenAI fine-tuning style."""

from __future__ import annotations

from typing import Any

from core.formats.base import ROLES, Example, Format, conversation, turns_of


class Chat(Format):
    name = "chat"
    line = '`{"messages": [{"role": "system"\\|"user"\\|"assistant"\\|"tool", "content": str}, ...]}` (OpenAI style)'
    loss_on = "assistant turns"

    def detect(self, first: Any) -> bool:
        return isinstance(first, dict) and "messages" in first

    def check(self, obj: dict[str, Any]) -> Example:
        return conversation(turns_of(obj, "messages", "role", "content", {r: r for r in ROLES}), "messages")


FORMAT = Chat()
