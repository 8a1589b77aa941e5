"""Dataset lint with the job's own tokenizer, and the training-time estimate from its first steps.

The datasets stage profiles an upload without a model (duplicates, empty answers, character counts). Only
the tuning stage knows the tokenizer, its chat template and `max_seq_len`, so this module redoes the
tokenization the recipe needs (`prepare_with_lint` returns exactly what `data.prepare` returns, the rows
are tokenized once) and measures, per job:

- a histogram of token lengths (whole rendered rows, before truncation);
- rows longer than `max_seq_len` (cut: the end of their answer is not trained on);
- rows with no trainable token after templating and truncation (skipped by training);
- exact-duplicate rows, and validation rows identical to a training row (the eval loss flatters the tune).

`Estimator` turns the speed of the first optimizer steps of the real run (the first one, a warm-up, left
out) into an estimate of the whole run (tokens times the measured tokens/s): no extra steps are spent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.formats import RowProblem
from events.payloads import DatasetLint, LengthBucket, LineError, LintWarning, TrainEstimate
from handlers.tuning import data as D

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("codetune.tuning.lint")

ESTIMATE_STEPS = 3  # optimizer steps of the real run measured before the estimate is made
_FIRST_EDGE = 16


def histogram_edges(max_seq_len: int) -> list[int]:
    """Bucket upper bounds: powers of two from 16 below `max_seq_len`, then `max_seq_len` itself."""
    edges, e = [], _FIRST_EDGE
    while e < max_seq_len:
        edges.append(e)
        e *= 2
    return [*edges, max_seq_len]


def histogram(lengths: list[int], max_seq_len: int) -> list[LengthBucket]:
    edges = histogram_edges(max_seq_len)
    counts = [0] * (len(edges) + 1)
    for n in lengths:
        counts[next((i for i, e in enumerate(edges) if n <= e), len(edges))] += 1
    return [LengthBucket(upto=e, rows=c) for e, c in zip([*edges, None], counts, strict=True)]


def _row_key(row: D.Row) -> bytes:
    text = row.text if row.messages is None else json.dumps(row.messages, sort_keys=True, ensure_ascii=False)
    return hashlib.blake2b((text or "").encode(), digest_size=16).digest()


@dataclass
class _Tokenized:
    examples: list[D.Example]
    keys: list[bytes]
    lengths: list[int]
    truncated: list[int]
    dropped: list[LineError]
    duplicates: list[int]
    empty_turns: list[int]


def _tokenize(tokenizer: PreTrainedTokenizerBase, rows: list[D.Row], max_seq_len: int) -> _Tokenized:
    """`data.tokenize_rows`, keeping the untruncated length and identity of every row."""
    out = _Tokenized([], [], [], [], [], [], [])
    seen: set[bytes] = set()
    for row in rows:
        key = _row_key(row)
        if key in seen:
            out.duplicates.append(row.line)
        seen.add(key)
        if not D.has_answer(row):
            out.dropped.append(LineError(line=row.line, message="no assistant text to learn from"))
            continue
        if row.example.empty_answers:
            out.empty_turns.append(row.line)
        try:
            if row.text is not None:
                full = D.tokenize_text(tokenizer, row.text, sys.maxsize)
            else:
                full = D.tokenize_chat(tokenizer, row.messages or [], sys.maxsize)
        except RowProblem as e:
            raise D.DatasetRowsError(f"line {row.line}: {e}", [LineError(line=row.line, message=str(e))]) from None
        out.lengths.append(len(full))
        if len(full) > max_seq_len:
            out.truncated.append(row.line)
        ex = D.Example(full.input_ids[:max_seq_len], full.labels[:max_seq_len], lines=[row.line])
        if ex.trainable < (2 if row.text is not None else 1):
            out.dropped.append(LineError(line=row.line, message=f"no trainable tokens within max_seq_len "
                                                                f"{max_seq_len}"))
            continue
        out.examples.append(ex)
        out.keys.append(key)
    return out


def prepare_with_lint(
    tokenizer: PreTrainedTokenizerBase, path: Path, fmt: str, max_seq_len: int, validation_split: float,
    seed: int, packing: bool,
) -> tuple[DatasetLint, list[D.Example], list[D.Example]]:
    """`data.prepare` (same train/validation sequences) plus the lint of the data it read."""
    rows = D.read_rows(path, fmt)
    t = _tokenize(tokenizer, rows, max_seq_len)
    if t.dropped:
        log.warning("dropped %d of %d rows with nothing to train on within max_seq_len=%d (lines %s)",
                    len(t.dropped), len(rows), max_seq_len, [e.line for e in t.dropped[:10]])
    if not t.examples:
        raise D._rows_error(Path(path), "training data", t.dropped[:D.MAX_REPORTED_ERRORS], len(t.dropped),
                            len(rows))
    index = {id(ex): i for i, ex in enumerate(t.examples)}
    train, val = D.split(t.examples, validation_split, seed)
    train_keys = {t.keys[index[id(ex)]] for ex in train}
    overlap = [ex.lines[0] for ex in val if t.keys[index[id(ex)]] in train_keys]
    found = [
        LintWarning.of("truncated_rows", t.truncated, f"{{n}} row(s) are longer than max_seq_len {max_seq_len} "
                       "tokens and are cut: the end of their answer is not trained on"),
        LintWarning.of("no_trainable_tokens", [e.line for e in t.dropped], "{n} row(s) have no trainable token "
                       f"after the chat template and truncation at {max_seq_len}: training skips them"),
        LintWarning.of("duplicate_rows", t.duplicates, "{n} row(s) repeat an earlier row exactly"),
        LintWarning.of("empty_assistant_turns", t.empty_turns, "{n} row(s) have an empty assistant turn: the "
                       "model learns to answer those prompts with nothing"),
        LintWarning.of("train_eval_overlap", overlap, "{n} validation row(s) also appear in the training split: "
                       "the eval loss overstates how well the tune generalises"),
    ]
    lint = DatasetLint(
        rows=len(rows), max_seq_len=max_seq_len, tokens=sum(t.lengths), max_tokens=max(t.lengths, default=0),
        histogram=histogram(t.lengths, max_seq_len), truncated=len(t.truncated), no_trainable=len(t.dropped),
        duplicates=len(t.duplicates), train_eval_overlap=len(overlap), train_rows=len(train), eval_rows=len(val),
        warnings=[w for w in found if w is not None],
    )
    if packing:
        train, val = D.pack(train, max_seq_len), D.pack(val, max_seq_len) if val else []
    return lint, train, val


def lint_summary(lint: DatasetLint) -> str:
    head = f"dataset lint: {lint.rows} rows, {lint.tokens} tokens (longest {lint.max_tokens})"
    if not lint.warnings:
        return head + ", no warnings"
    return head + "; " + "; ".join(w.message for w in lint.warnings)


def lint_text(lint: DatasetLint) -> str:
    """Several lines for `codetune job show`: sizes, the length histogram, then one line per warning."""
    lines = [f"{lint.rows} rows ({lint.train_rows} train, {lint.eval_rows} eval), {lint.tokens} tokens, "
             f"longest {lint.max_tokens}, max_seq_len {lint.max_seq_len}"]
    lines.append("tokens per row: " + ", ".join(
        f"{'≤' + str(b.upto) if b.upto is not None else '>' + str(lint.max_seq_len)}: {b.rows}"
        for b in lint.histogram if b.rows))
    lines += [f"warning {w.code}: {w.message} (lines {', '.join(map(str, w.lines))})" for w in lint.warnings]
    return "\n".join(lines)


class Estimator:
    """Made once per run from the speed of this session's steps 2 to 1 + `ESTIMATE_STEPS`.

    The first step of a session is left out (lazy initialisation and allocator warm-up make it slow), and
    the speed is wall-clock tokens/s between two steps, so an eval or checkpoint in between counts too.
    A run too short for that is estimated from the recipe's own tokens/s at its last step.
    """

    def __init__(self, train: list[D.Example], batch_size: int, accum: int, start_step: int) -> None:
        self.epoch_tokens = D.real_tokens(train)
        self.batches = max(1, D.num_batches(len(train), batch_size))
        self.accum = accum
        self.start_step = start_step
        self.done = False
        self._first: tuple[int, int, float] | None = None  # (step, tokens, time) after the warm-up step

    def observe(self, info: Any, now: float | None = None) -> TrainEstimate | None:
        """The estimate when `info` (a recipe StepInfo) completes the measured steps, else None."""
        if self.done:
            return None
        now = time.perf_counter() if now is None else now
        if self._first is None or info.step == self._first[0]:
            if self._first is None:
                self._first = (info.step, info.tokens, now)
            if info.step < info.max_steps or not info.tokens_per_s:
                return None
            return self._make(info.tokens_per_s, info.step - self.start_step, info.max_steps)
        step0, tokens0, t0 = self._first
        if info.step - step0 < ESTIMATE_STEPS and info.step < info.max_steps:
            return None
        if now <= t0 or info.tokens <= tokens0:
            return None
        return self._make((info.tokens - tokens0) / (now - t0), info.step - step0, info.max_steps)

    def _make(self, tokens_per_s: float, measured: int, max_steps: int) -> TrainEstimate | None:
        if not math.isfinite(tokens_per_s) or tokens_per_s <= 0:
            return None
        self.done = True
        tokens = round(self.epoch_tokens * (max_steps - self.start_step) * self.accum / self.batches)
        return TrainEstimate(tokens=tokens, tokens_per_s=round(tokens_per_s, 2),
                             seconds=round(tokens / tokens_per_s, 2), measured_steps=measured)


def estimate_summary(e: TrainEstimate) -> str:
    return (f"estimate: ~{e.seconds:.0f} s of training ({e.tokens} tokens at {e.tokens_per_s:.0f} tok/s, "
            f"measured over the first {e.measured_steps} steps)")
