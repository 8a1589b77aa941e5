"""The dataset-format registry: both stages read rows through it, so they agree on every row."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import pytest

from core import formats
from core.errors import DatasetFormatError
from events.payloads import DatasetFormat, DatasetUploaded, UploadFormat
from handlers.datasets.validate import validate_bytes
from handlers.tuning import data as D

ROOT = Path(__file__).resolve().parents[2]


def judge_both(tmp_path: Path, fmt: str, line: str) -> tuple[str | None, str | None]:
    """(validator's error, trainer's error) for a one-row file in `fmt`; None where the row is accepted."""
    report = validate_bytes([line.encode() + b"\n"], fmt=fmt)
    validator = None if report.ok else report.line_errors[0].message
    path = tmp_path / f"row-{fmt}.jsonl"
    path.write_bytes(line.encode() + b"\n")
    try:
        D.read_rows(path, fmt)
        trainer = None
    except D.DatasetRowsError as e:
        trainer = e.line_errors[0].message
    return validator, trainer


def msg(role: str, content: Any) -> dict[str, Any]:
    return {"role": role, "content": content}


ROWS: list[tuple[str, Any, str | None]] = [  # (format, row, the validator's error or None)
    ("text", "The sky is blue.", None),
    ("text", '{"looks": "like json"}', None),
    ("alpaca", {"instruction": "Say hi", "input": "", "output": "hi"}, None),
    ("alpaca", {"instruction": "Say nothing", "output": ""}, None),  # valid: a no_trainable_tokens warning
    ("alpaca", {"instruction": "x"}, "missing required key 'output'"),
    ("alpaca", {"output": "y"}, "missing required key 'instruction'"),
    ("alpaca", {"instruction": "  ", "output": "y"}, "'instruction' is empty"),
    ("alpaca", {"instruction": 3, "output": "y"}, "'instruction' must be a string, got int"),
    ("alpaca", {"instruction": "x", "input": ["a"], "output": "y"}, "'input' must be a string, got list"),
    ("alpaca", {"instruction": "x", "output": None}, "'output' must be a string, got NoneType"),
    ("alpaca", [1, 2], "expected a JSON object, got list"),
    ("alpaca", "{not json", "invalid JSON: Expecting property name enclosed in double quotes at column 2"),
    ("chat", {"messages": [msg("system", "s"), msg("user", "q"), msg("assistant", "a")]}, None),
    ("chat", {"messages": [msg("user", "q"), msg("assistant", ""), msg("user", "q2"), msg("assistant", "a")]},
     None),  # valid: an empty_assistant_turns warning
    ("chat", {"messages": [msg("user", "q"), msg("system", "late"), msg("assistant", "a")]},
     "messages[1]: a system message may only come first"),  # the trainer used to accept this row
    ("chat", {"messages": [msg("user", "q")]}, "no assistant message: nothing to learn from this example"),
    ("chat", {"messages": []}, "'messages' must be a non-empty list"),
    ("chat", {"messages": "hi"}, "'messages' must be a non-empty list"),
    ("chat", {"messages": ["hi"]}, "messages[0] must be an object"),
    ("chat", {"messages": [msg("robot", "x")]},
     "messages[0].role must be one of ['assistant', 'system', 'tool', 'user'], got 'robot'"),
    ("chat", {"messages": [msg("user", "q"), msg("assistant", 42)]}, "messages[1].content must be a string"),
]


@pytest.mark.parametrize(("fmt", "row", "error"), ROWS, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(ROWS)])
def test_validator_and_trainer_agree_on_every_row(tmp_path: Path, fmt: str, row: Any, error: str | None) -> None:
    line = row if isinstance(row, str) else json.dumps(row)
    assert judge_both(tmp_path, fmt, line) == (error, error)


@pytest.mark.parametrize("raw", [b"\xff\xfe broken", ("x" * (formats.MAX_LINE_CHARS + 1)).encode()])
def test_line_rules_are_the_same_for_both_stages(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine\n" + raw + b"\n")
    report = validate_bytes([path.read_bytes()], fmt="text")
    with pytest.raises(DatasetFormatError) as err:
        D.read_rows(path, "text")
    assert [(e.line, e.message) for e in report.line_errors] == [
        (e.line, e.message) for e in err.value.line_errors]  # type: ignore[attr-defined]
    assert report.line_errors[0].line == 2


def test_the_contract_lists_exactly_the_registered_formats() -> None:
    assert set(get_args(DatasetFormat)) == set(formats.NAMES) == set(formats.FORMATS)
    assert get_args(UploadFormat) == ("auto", *formats.NAMES)
    for name in formats.NAMES:
        assert DatasetUploaded(dataset_id="ds-abc", key="datasets/ds-abc/x.jsonl", name="x.jsonl", format=name)
    with pytest.raises(ValueError, match="format"):
        DatasetUploaded(dataset_id="ds-abc", key="datasets/ds-abc/x.jsonl", name="x.jsonl", format="csv")
    with pytest.raises(DatasetFormatError, match="unknown dataset format 'csv'"):
        D.read_rows(ROOT / "README.md", "csv")


@pytest.mark.parametrize(("first", "expected"), [
    ("plain words", "text"), ("{broken json", "text"), ('{"unrelated": 1}', "text"), ("[1, 2]", "text"),
    ('{"instruction": "x", "output": "y"}', "alpaca"), ('{"messages": []}', "chat"),
])
def test_detection_from_the_first_line(first: str, expected: str) -> None:
    assert formats.detect(first).name == expected
    assert validate_bytes([f"\n{first}\n".encode()]).format == expected


def test_readme_format_table_is_generated_from_the_registry() -> None:
    out = subprocess.run([sys.executable, "-m", "core.formats", "--readme", "--check"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert all(f"| `{name}` |" in readme for name in formats.NAMES)


def test_core_imports_nothing_of_ours() -> None:
    code = ("import sys; import core.formats; "
            "ours = [m for m in sys.modules if m.split('.')[0] in ('events', 'storage', 'handlers', 'infra')]; "
            "heavy = [m for m in ('torch', 'transformers', 'pydantic') if m in sys.modules]; "
            "assert not ours and not heavy, (ours, heavy)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
