"""Dataset validation and profiling (pure functions; no stack)."""

import json

from core import formats
from handlers.datasets.validate import validate_bytes


def chunks(text: str, size: int = 7) -> list[bytes]:
    data = text.encode()
    return [data[i:i + size] for i in range(0, len(data), size)]


def test_text_profile_counts_rows_chars_and_tokens() -> None:
    r = validate_bytes(chunks("hello world\n\nsecond line here\n"))
    assert r.ok and r.format == "text"
    assert r.profile.rows == 2  # the blank line is not a row
    assert r.profile.chars == len("hello world") + len("second line here")
    assert r.profile.tokens_estimate == (r.profile.chars + 3) // 4


def test_alpaca_and_chat_are_detected_and_validated() -> None:
    alpaca = "\n".join(json.dumps({"instruction": f"q{i}", "input": "", "output": f"a{i}"}) for i in range(3))
    r = validate_bytes(chunks(alpaca))
    assert r.ok and r.format == "alpaca" and r.profile.rows == 3
    chat = json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "hello"}]})
    r = validate_bytes([chat.encode()])
    assert r.ok and r.format == "chat" and r.profile.roles == {"system": 1, "user": 1, "assistant": 1}


def test_bad_lines_are_reported_with_numbers_and_reasons() -> None:
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    lines = [
        good,
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
        good,
    ]
    r = validate_bytes(chunks("\n".join(lines)))
    assert not r.ok
    assert [e.line for e in r.line_errors] == [2, 3, 4]
    assert "invalid JSON" in r.line_errors[0].message
    assert "no assistant message" in r.line_errors[1].message
    assert "'robot'" in r.line_errors[2].message
    assert r.summary.startswith("3 of 5 lines are invalid (chat format); first: line 2")


def test_error_list_is_capped_but_all_invalid_lines_counted() -> None:
    first = json.dumps({"instruction": "x", "output": "y"})
    text = first + "\n" + "\n".join("[1, 2]" for _ in range(50))
    r = validate_bytes([text.encode()], max_errors=5)
    assert r.invalid_lines == 50 and len(r.line_errors) == 5


def test_invalid_utf8_and_empty_file() -> None:
    r = validate_bytes([b"ok line\n\xff\xfe broken\n"])
    assert not r.ok and r.line_errors[0].line == 2 and "UTF-8" in r.line_errors[0].message
    empty = validate_bytes([b"\n\n  \n"])
    assert not empty.ok and "empty" in empty.summary


def test_explicit_format_overrides_detection() -> None:
    assert formats.detect('{"messages": []}').name == "chat"
    r = validate_bytes([b'{"messages": []}\n'], fmt="text")
    assert r.ok and r.format == "text"
