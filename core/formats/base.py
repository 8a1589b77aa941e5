"""What every dataset format is made of: the `Format` base class, the tokenizer-independent `Example`, the
row problem a check raises, the JSON helpers and the one conversation rule all chat-like formats share.

Standard library only: the datasets stage (which never imports torch) and the trainer both use it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

# The roles a conversation may use once a format has mapped its own names onto them, and the one whose
# turns are trained on (every other turn is prompt: loss-masked).
ROLES = ("system", "user", "assistant", "tool")
TRAINED_ROLE = "assistant"

# Used only when a tokenizer has no chat template of its own (a base model): the adapter directory then
# carries this template, so export/serving render prompts exactly as training did. Every turn ends with
# <|im_end|>, so a model tuned through it learns to stop.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

Messages = list[dict[str, str]]


class RowProblem(ValueError):
    """One row cannot be used; the message names the field and what is wrong with it."""


class UnknownFormatError(ValueError):
    """A format name that no module in `core/formats/` defines."""


@dataclass
class Example:
    """One checked row, independent of any tokenizer.

    Exactly one of `text` (a plain causal-LM example: every token is trained on) and `messages` (a
    conversation in `ROLES`: only `TRAINED_ROLE` turns are trained on, the rest is prompt) is set.
    `chars` and `roles` are what the dataset profile counts for the row; `key` is its canonical text
    (equal keys are exact duplicates). `answers` / `empty_answers` (derived): the turns trained on and
    those of them with no content (a text example counts as one answer).
    """

    text: str | None = None
    messages: Messages | None = None
    chars: int = 0
    roles: Mapping[str, int] = field(default_factory=dict)
    key: str = ""
    answers: int = field(init=False, default=1)
    empty_answers: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.messages is None:
            self.empty_answers = 0 if (self.text or "").strip() else 1
            return
        answers = empty = 0
        for m in self.messages:
            if m["role"] == TRAINED_ROLE:
                answers += 1
                if not m["content"].strip():
                    empty += 1
        self.answers, self.empty_answers = answers, empty

    @property
    def trainable(self) -> bool:
        """Whether there is any text to learn from (training skips the row otherwise)."""
        return self.empty_answers < self.answers


class Format:
    """A dataset format: subclass it in a module of `core/formats/` named after it, set `FORMAT = ...`.

    - `name`: the format's name in events, documents, the CLI and the REST API (= the module's name);
    - `line` / `loss_on`: one line each for the README table (what a line is, what is trained on);
    - `detect(first)`: whether a file whose first non-blank line is `first` is in this format (`first` is
      that line parsed as JSON, or the line itself when it is not JSON); the `fallback` format is chosen
      when no other claims the line;
    - `check(obj)`: the parsed row → an `Example`, or `RowProblem` naming the field and what is wrong.
    JSON-lines formats implement `check`; a format whose lines are not JSON overrides `parse` instead.
    """

    name: ClassVar[str]
    line: ClassVar[str]
    loss_on: ClassVar[str]
    fallback: ClassVar[bool] = False

    def detect(self, first: Any) -> bool:
        raise NotImplementedError

    def check(self, obj: dict[str, Any]) -> Example:
        raise NotImplementedError

    def parse(self, line: str) -> Example:
        """One non-blank line (already decoded) → its `Example` with its duplicate key set."""
        obj = json_object(line)
        ex = self.check(obj)
        ex.key = canonical(obj)
        return ex


# --------------------------------------------------------------------------- helpers for format modules


def json_object(line: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise RowProblem(f"invalid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise RowProblem(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def str_field(obj: Mapping[str, Any], name: str, *, required: bool) -> str:
    """`obj[name]` as a string: missing → "" unless `required`; a required one must not be blank."""
    if name not in obj:
        if required:
            raise RowProblem(f"missing required key '{name}'")
        return ""
    value = obj[name]
    if not isinstance(value, str):
        raise RowProblem(f"'{name}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise RowProblem(f"'{name}' is empty")
    return value


def turns_of(obj: dict[str, Any], field: str, role_key: str, text_key: str, roles: Mapping[str, str]
             ) -> list[tuple[str, str]]:
    """The checked `(role, text)` turns of a list-of-objects conversation (`obj[field]`); `roles` maps the
    format's role names to ours (the chat formats differ only in these names)."""
    items = obj.get(field)
    if not isinstance(items, list):
        raise RowProblem(f"'{field}' must be a non-empty list")
    out: list[tuple[str, str]] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise RowProblem(f"{field}[{i}] must be an object")
        who, text = item.get(role_key), item.get(text_key)
        if not isinstance(who, str) or who not in roles:
            raise RowProblem(f"{field}[{i}].{role_key} must be one of {sorted(roles)}, got {who!r}")
        if not isinstance(text, str):
            raise RowProblem(f"{field}[{i}].{text_key} must be a string")
        out.append((roles[who], text))
    return out


def conversation(turns: Sequence[tuple[str, str]], where: str) -> Example:
    """The rule every chat-like format obeys, decided once: `turns` are (role in `ROLES`, content) pairs
    already checked for type; a system message may only come first, and at least one turn must be an
    assistant turn (empty ones are allowed: the profile warns, training skips a row with no text)."""
    if not turns:
        raise RowProblem(f"'{where}' must be a non-empty list")
    roles: dict[str, int] = {}
    chars = 0
    for i, (role, content) in enumerate(turns):
        if role == "system" and i:
            raise RowProblem(f"{where}[{i}]: a system message may only come first")
        roles[role] = roles.get(role, 0) + 1
        chars += len(content)
    if TRAINED_ROLE not in roles:
        raise RowProblem("no assistant message: nothing to learn from this example")
    return Example(messages=[{"role": r, "content": c} for r, c in turns], chars=chars, roles=roles)
