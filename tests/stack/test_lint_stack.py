"""Dataset lint and the training-time estimate, on the real stack with the tiny Llama.

One crafted chat dataset carries every problem the lint reports, in known numbers: exact duplicates, a row
whose only answer is empty, a row with one empty assistant turn, over-long rows, and (through the
duplicates) validation rows that also sit in the training split.
"""

from __future__ import annotations

import json
import math
import uuid

import pytest

from events import subjects as sj
from events.payloads import TuningRequested
from handlers.tuning import data as D
from infra.flows import upload_dataset
from storage.documents import TuningJob
from tests.conftest import TINY_REPO

pytestmark = [pytest.mark.usefixtures("workers", "tuning_worker"), pytest.mark.slow]
TERMINAL = [sj.TUNING_COMPLETED, sj.TUNING_FAILED, sj.TUNING_CANCELLED]
MAX_SEQ_LEN = 64
SEED = 42
SPLIT = 0.2


def _chat(*turns: str) -> dict:
    roles = ["user", "assistant"] * len(turns)
    return {"messages": [{"role": r, "content": c} for r, c in zip(roles, turns, strict=False)]}


def crafted_rows() -> list[dict]:
    distinct = [_chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(20)]
    rows = list(distinct)
    rows += [distinct[0]] * 5 + [distinct[1]]  # 6 exact duplicates
    rows.append(_chat("Say nothing.", ""))  # no answer at all: nothing to train on
    rows.append(_chat("Hi", "Hello!", "And now?", "  "))  # one empty assistant turn
    rows += [_chat(f"Tell a long story number {i}.", " ".join(["once upon a time"] * 60)) for i in range(3)]
    return rows


def expected_overlap(rows: list[dict]) -> int:
    """Validation rows identical to a training row, from the training split itself (`data.split`)."""
    kept = [(line, json.dumps(r, sort_keys=True)) for line, r in enumerate(rows, start=1)
            if any(m["role"] == "assistant" and m["content"].strip() for m in r["messages"])]
    examples = [D.Example([0], [0], lines=[line]) for line, _ in kept]
    key = dict(kept)
    train, val = D.split(examples, SPLIT, SEED)
    train_keys = {key[ex.lines[0]] for ex in train}
    return sum(1 for ex in val if key[ex.lines[0]] in train_keys)


@pytest.fixture(scope="module")
async def crafted(settings, tmp_path_factory) -> tuple[str, list[dict], object]:
    rows = crafted_rows()
    path = tmp_path_factory.mktemp("lint") / "crafted.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    subject, answer = await upload_dataset(settings, path, "crafted.jsonl", "auto", True, 30)
    assert subject == sj.DATASET_VALIDATED, answer
    return answer.dataset_id, rows, answer.profile


def _by_code(warnings: list) -> dict[str, tuple[int, list[int]]]:
    return {w.code: (w.count, w.lines) for w in warnings}


async def test_the_profile_warns_about_duplicates_and_empty_answers(crafted) -> None:
    _, rows, profile = crafted
    assert profile.rows == len(rows) == 31
    assert _by_code(profile.warnings) == {
        "duplicate_rows": (6, [21, 22, 23, 24, 25, 26]),
        "no_trainable_tokens": (1, [27]),
        "empty_assistant_turns": (1, [28]),
    }


async def test_the_job_lints_with_its_tokenizer_and_estimates_before_it_ends(client, crafted) -> None:
    dataset_id, rows, _ = crafted
    req = TuningRequested(job_id=f"ftjob-{uuid.uuid4().hex[:12]}", base_model=TINY_REPO, dataset_id=dataset_id,
                          export=None,  # no export: nothing left running in the background for later tests
                          hyperparameters={"max_steps": 12, "learning_rate": 1e-2, "batch_size": 4,
                                           "eval_steps": 6, "save_steps": 6, "lora_r": 8, "seed": SEED,
                                           "validation_split": SPLIT, "max_seq_len": MAX_SEQ_LEN})
    async with client.subscribe([*TERMINAL, sj.progress_subject(req.job_id)]) as q:
        await client.publish(req)
        seen: list[tuple[str, object]] = []
        while True:
            subject, ev = await client.wait_for(q, lambda s, d: d.get("job_id") == req.job_id, 240)
            seen.append((subject, ev))
            if subject in TERMINAL:
                break
    assert subject == sj.TUNING_COMPLETED, ev
    messages = [getattr(e, "message", None) or "" for s, e in seen if s not in TERMINAL]
    lint_at = next(i for i, m in enumerate(messages) if m.startswith("dataset lint:"))
    estimate_at = next(i for i, m in enumerate(messages) if m.startswith("estimate:"))
    assert lint_at < estimate_at < len(seen) - 1  # both announced while the job was still running

    doc = await TuningJob.find_one(TuningJob.job_id == req.job_id)
    lint = doc.dataset_lint
    overlap = expected_overlap(rows)
    assert overlap > 0
    assert _by_code(lint.warnings) == {
        "truncated_rows": (3, [29, 30, 31]),
        "no_trainable_tokens": (1, [27]),
        "duplicate_rows": (6, [21, 22, 23, 24, 25, 26]),
        "empty_assistant_turns": (1, [28]),
        "train_eval_overlap": (overlap, lint.warnings[-1].lines),
    }
    assert (lint.rows, lint.truncated, lint.no_trainable, lint.duplicates) == (31, 3, 1, 6)
    assert lint.train_rows + lint.eval_rows == 30 and lint.eval_rows == 6
    assert sum(b.rows for b in lint.histogram) == 30  # every row with an answer was tokenized
    assert lint.histogram[-1].upto is None and lint.histogram[-1].rows == 3  # the three long stories
    assert lint.max_tokens > MAX_SEQ_LEN and lint.max_seq_len == MAX_SEQ_LEN

    est = doc.estimate
    assert est.measured_steps == 3 and doc.metrics["steps"] == 12  # measured on steps 2-4 of 12
    assert est.tokens > 0 and est.tokens_per_s > 0 and math.isfinite(est.seconds) and est.seconds > 0
    actual = doc.metrics["tokens"] / doc.metrics["tokens_per_s"]  # time inside the optimizer steps
    print(f"estimate {est.seconds:.2f} s vs actual training {actual:.2f} s (ratio {est.seconds / actual:.2f}); "
          f"estimated tokens {est.tokens} vs actual {doc.metrics['tokens']}; whole job "
          f"{doc.metrics['duration_s']:.1f} s")
    assert 0.5 <= est.tokens / doc.metrics["tokens"] <= 2  # the token count extrapolates the real run


def test_expected_overlap_helper_sees_the_duplicates() -> None:
    """The test's own reference: the crafted rows do put a duplicate on both sides of the split."""
    assert expected_overlap(crafted_rows()) > 0
