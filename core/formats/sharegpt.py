"""`sharegpt`: `{"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}` (ShareGPT/FastChat).

The names accepted for `from` are those common trainers map by default (axolotl's chat_template
`message_property_mappings`): `human`/`user`, `gpt`/`assistant`, `system`, `tool`. Turns are mapped onto
the chat roles and then obey the same conversation rule as `chat`.
"""

from __future__ import annotations

from typing import Any

from core.formats.base import Example, Format, RowProblem, conversation

ROLE_OF = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
           "tool": "tool"}


class ShareGPT(Format):
    name = "sharegpt"
    line = '`{"conversations": [{"from": "system"\\|"human"\\|"gpt", "value": str}, ...]}` (`user`/`assistant` too)'
    loss_on = "`gpt` turns"

    def detect(self, first: Any) -> bool:
        return isinstance(first, dict) and "conversations" in first

    def check(self, obj: dict[str, Any]) -> Example:
        turns = obj.get("conversations")
        if not isinstance(turns, list):
            raise RowProblem("'conversations' must be a non-empty list")
        mapped: list[tuple[str, str]] = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict):
                raise RowProblem(f"conversations[{i}] must be an object")
            who, value = t.get("from"), t.get("value")
            if who not in ROLE_OF:
                raise RowProblem(f"conversations[{i}].from must be one of {sorted(ROLE_OF)}, got {who!r}")
            if not isinstance(value, str):
                raise RowProblem(f"conversations[{i}].value must be a string")
            mapped.append((ROLE_OF[who], value))
        return conversation(mapped, "conversations")


FORMAT = ShareGPT()
