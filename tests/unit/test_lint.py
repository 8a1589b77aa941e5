"""The tuning stage's lint and estimate without a broker: same data as `data.prepare`, sane numbers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devkit.tinymodel import build_tiny_llama
from handlers.tuning import data as D
from handlers.tuning.lint import Estimator, histogram, lint_text, prepare_with_lint
from tests.stack.test_lint_stack import crafted_rows, expected_overlap


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def crafted_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lint") / "crafted.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in crafted_rows()), encoding="utf-8")
    return path


@pytest.mark.parametrize("packing", [True, False])
def test_lint_trains_on_exactly_what_prepare_gives(tok: Any, crafted_path: Path, packing: bool) -> None:
    lint, train, val = prepare_with_lint(tok, crafted_path, "chat", 64, 0.2, 42, packing)
    ref_train, ref_val = D.prepare(tok, crafted_path, "chat", 64, 0.2, 42, packing)
    assert [(e.input_ids, e.labels, e.position_ids) for e in train] == [
        (e.input_ids, e.labels, e.position_ids) for e in ref_train]
    assert [(e.input_ids, e.labels) for e in val] == [(e.input_ids, e.labels) for e in ref_val]
    assert lint.train_eval_overlap == expected_overlap(crafted_rows()) > 0
    assert {w.code: w.count for w in lint.warnings} == {"truncated_rows": 3, "no_trainable_tokens": 1,
                                                          "duplicate_rows": 6, "empty_assistant_turns": 1,
                                                          "train_eval_overlap": lint.train_eval_overlap}
    text = lint_text(lint)
    assert ">64: 3" in text and "warning truncated_rows" in text and "lines 29, 30, 31" in text


def test_a_prompt_longer_than_max_seq_len_leaves_nothing_to_train(tok: Any, tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": "long " * 100}, {"role": "assistant", "content": "ok"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lint, train, _ = prepare_with_lint(tok, path, "chat", 32, 0.0, 1, False)
    assert (lint.truncated, lint.no_trainable, len(train)) == (1, 1, 1)
    assert [(w.code, w.lines) for w in lint.warnings] == [("truncated_rows", [1]), ("no_trainable_tokens", [1])]


def test_histogram_buckets_end_at_max_seq_len_then_overflow() -> None:
    buckets = histogram([1, 16, 17, 100, 128, 129, 5000], 128)
    assert [(b.upto, b.rows) for b in buckets] == [(16, 2), (32, 1), (64, 0), (128, 2), (None, 2)]


@dataclass
class _Step:
    step: int
    max_steps: int
    tokens: int
    tokens_per_s: float


def test_the_estimate_leaves_out_the_warm_up_step() -> None:
    train = [D.Example([1] * 50, [1] * 50) for _ in range(8)]  # 400 tokens an epoch, 2 batches of 4
    est = Estimator(train, batch_size=4, accum=1, start_step=0)
    # step 1 is slow (warm-up); then 200 tokens per 0.1 s
    assert est.observe(_Step(1, 10, 200, 20.0), now=10.0) is None
    assert est.observe(_Step(2, 10, 400, 50.0), now=10.1) is None
    assert est.observe(_Step(3, 10, 600, 60.0), now=10.2) is None
    e = est.observe(_Step(4, 10, 800, 70.0), now=10.3)
    assert e is not None and e.measured_steps == 3 and e.tokens == 2000
    assert e.tokens_per_s == pytest.approx(2000.0) and e.seconds == pytest.approx(1.0)
    assert est.observe(_Step(5, 10, 1000, 70.0), now=10.4) is None  # made once


def test_a_one_step_run_is_estimated_from_its_own_speed() -> None:
    est = Estimator([D.Example([1] * 10, [1] * 10)], batch_size=1, accum=1, start_step=0)
    e = est.observe(_Step(1, 1, 10, 5.0), now=1.0)
    assert e is not None and e.measured_steps == 1 and e.seconds == pytest.approx(2.0)


def test_an_empty_alpaca_output_is_a_warning_in_both_stages(tok: Any, tmp_path: Path) -> None:
    from handlers.datasets.validate import validate_bytes

    rows = [{"instruction": "Say hi", "output": "hi"}, {"instruction": "Say nothing", "output": ""},
            {"instruction": "Say hi", "output": "hi"}]
    body = "".join(json.dumps(r) + "\n" for r in rows)
    report = validate_bytes([body.encode()])
    assert report.ok and {(w.code, tuple(w.lines)) for w in report.profile.warnings} == {
        ("no_trainable_tokens", (2,)), ("duplicate_rows", (3,))}
    path = tmp_path / "a.jsonl"
    path.write_text(body)
    lint, train, val = prepare_with_lint(tok, path, "alpaca", 64, 0.0, 1, False)
    assert (lint.no_trainable, lint.duplicates, len(train), val) == (1, 1, 2, [])
    assert [ex.lines for ex in train] == [[1], [3]]
