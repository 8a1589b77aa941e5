"""`sharegpt`: `{"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}` (ShareGPT/FastChat).

The names accepted for `from` are those common trainers map by default (axolotl's chat_template
`message_property_mappings`): `human`/`user`, `gpt`/`assistant`, `system`, `tool`. Turns are mapped onto
the chat roles and then obey the same conversation rule as `chat`.
"""

from __future__ import annotations

from typing import Any

from core.formats.base import Example, Format, conversation, turns_of

ROLE_OF = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
           "tool": "tool"}


class ShareGPT(Format):
    name = "sharegpt"
    line = '`{"conversations": [{"from": "system"\\|"human"\\|"gpt", "value": str}, ...]}` (`user`/`assistant` too)'
    loss_on = "`gpt` turns"

    def detect(self, first: Any) -> bool:
        return isinstance(first, dict) and "conversations" in first

    def check(self, obj: dict[str, Any]) -> Example:
        return conversation(turns_of(obj, "conversations", "from", "value", ROLE_OF), "conversations")


FORMAT = ShareGPT()
