"""`alpaca`: `{"instruction": str, "input": str?, "output": str}`, trained as a user/assistant chat."""

from __future__ import annotations

from typing import Any

from core.formats.base import Example, Format, RowProblem, str_field


class Alpaca(Format):
    name = "alpaca"
    line = '`{"instruction": str, "input": str?, "output": str}`'
    loss_on = "the output"

    def detect(self, first: Any) -> bool:
        return isinstance(first, dict) and ("instruction" in first or "output" in first)

    def check(self, obj: dict[str, Any]) -> Example:
        instruction = str_field(obj, "instruction", required=True)
        extra = str_field(obj, "input", required=False)
        output = str_field(obj, "output", required=False)
        if "output" not in obj:
            raise RowProblem("missing required key 'output'")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction  # the input follows
        return Example(messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": output}],
                       chars=len(instruction) + len(extra) + len(output))


FORMAT = Alpaca()
