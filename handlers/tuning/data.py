"""Training data for the tuning stage: read → check → tokenize (with loss masks) → split → pack/pad.

Like litgpt's data modules, this module checks its own input instead of trusting that the dataset stage
ran: a file can be re-uploaded, or a format mis-declared. Rows are read through the format registry
(`core/formats/`, one module per format), the same checks the datasets stage runs, so the trainer never
accepts a row the validator rejects. A row that cannot be used is an error naming its 1-based line
(`DatasetRowsError`, a `DatasetFormatError`), never a silent skip or a crash deep in a loop.

Each format turns a row into a tokenizer-independent example: plain text (a causal LM, loss on every
token, each example ends with EOS) or a conversation rendered through the tokenizer's own chat template
(ChatML when it has none), so the tune matches how the model is prompted when served; only assistant turns
(including their end-of-turn token, so the model learns to stop) carry labels, everything else is
`IGNORE_INDEX`.

Packing puts whole examples into sequences of up to `max_seq_len` tokens (best-fit decreasing: blocks
come out nearly full, and no example is cut off from its prompt). Each example restarts its
`position_ids` at 0; transformers (≥ 4.54) turns such position ids into a block-diagonal causal mask when
no attention mask is given, so packed examples do not attend to each other. The first label of every
example is masked so no token is ever trained to follow a different example.

Only `to_tensors` needs torch (imported there): reading and checking a dataset stays light.
"""

from __future__ import annotations

import bisect
import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from core import formats
from core.errors import DatasetFormatError
from core.formats import TRAINED_ROLE, Messages, RowProblem
from events.payloads import LineError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("codetune.tuning.data")

IGNORE_INDEX = -100
MAX_REPORTED_ERRORS = 20


class DatasetRowsError(DatasetFormatError):
    """Rows that cannot be trained on; `line_errors` names them (first `MAX_REPORTED_ERRORS`)."""

    def __init__(self, message: str, line_errors: list[LineError]) -> None:
        super().__init__(message)
        self.line_errors = line_errors


@dataclass(frozen=True)
class Row:
    """One usable source row: its 1-based line and its format's example (plain text or chat messages)."""

    line: int
    example: formats.Example

    @property
    def text(self) -> str | None:
        return self.example.text

    @property
    def messages(self) -> Messages | None:
        return self.example.messages


@dataclass
class Example:
    """A tokenized training sequence. `position_ids` is None for an unpacked example (0..n-1)."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None
    lines: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trainable(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


# --------------------------------------------------------------------------- reading and checking


def has_answer(row: Row) -> bool:
    """Whether the row has text to learn from (plain text, or a non-empty assistant turn)."""
    return row.example.trainable


def _rows_error(path: Path, fmt: str, errors: list[LineError], bad: int, total: int) -> DatasetRowsError:
    shown = "; ".join(f"line {e.line}: {e.message}" for e in errors[:3])
    more = f" (+{bad - 3} more)" if bad > 3 else ""
    return DatasetRowsError(
        f"{path.name}: {bad} of {total} rows cannot be used as {fmt}: {shown}{more}", errors
    )


def read_rows(path: Path, fmt: str) -> list[Row]:
    """Parse and check every non-blank line; raise `DatasetRowsError` naming the bad ones."""
    try:
        parser = formats.get(fmt)
    except formats.UnknownFormatError as e:
        raise DatasetFormatError(str(e)) from None
    rows: list[Row] = []
    errors: list[LineError] = []
    bad = total = 0
    with Path(path).open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                example = formats.parse_line(parser, raw.removesuffix(b"\n"))
            except RowProblem as e:
                total += 1
                bad += 1
                if len(errors) < MAX_REPORTED_ERRORS:
                    errors.append(LineError(line=line_no, message=str(e)))
                continue
            if example is not None:
                total += 1
                rows.append(Row(line_no, example))
    if bad:
        raise _rows_error(Path(path), fmt, errors, bad, total)
    if not rows:
        raise DatasetFormatError(f"{Path(path).name}: dataset is empty (no non-blank lines)")
    return rows


# --------------------------------------------------------------------------- tokenization


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Give a template-less (base-model) tokenizer ChatML; return True when it had to.

    `tokenize_chat` calls it, so the first conversation rendered sets it (it is saved with the adapter)."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = formats.CHATML_TEMPLATE
    log.warning("tokenizer has no chat template; using ChatML (saved with the adapter)")
    return True


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(tokenizer: PreTrainedTokenizerBase, messages: Messages, generation_prompt: bool) -> str:
    if not messages:
        return ""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert isinstance(text, str)  # tokenize=False renders text
    return text


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _assistant_char_spans(tokenizer: PreTrainedTokenizerBase, messages: Messages, full: str) -> list[
    tuple[int, int]
]:
    """Character spans of each assistant turn in the rendered chat, end-of-turn marker included.

    Rendering the conversation up to a turn (with the generation prompt) and up to its end gives both
    boundaries for any template whose rendering grows by appending (ChatML, Llama 3, Mistral, Gemma…).
    Templates that rewrite earlier turns fall back to locating the content text itself.
    """
    spans: list[tuple[int, int]] = []
    cursor = 0
    eos = tokenizer.eos_token or ""
    for k, message in enumerate(messages):
        if message["role"] != TRAINED_ROLE:
            continue
        before = _render(tokenizer, messages[:k], True)
        upto = _render(tokenizer, messages[: k + 1], False)
        if full.startswith(before) and full.startswith(upto) and cursor <= len(before) < len(upto):
            start, end = len(before), len(upto)
        else:
            start = full.find(message["content"], cursor)
            if start < 0:
                raise RowProblem(f"chat template dropped assistant turn {k}: cannot locate it to train on")
            end = start + len(message["content"])
            if eos and full.startswith(eos, end):
                end += len(eos)
        spans.append((start, end))
        cursor = end
    return spans


def _token_index(tokenizer: PreTrainedTokenizerBase, full: str, full_ids: list[int], pos: int) -> int:
    """Token index where character `pos` starts: tokens of the text before it, as a prefix of the whole.

    If a token straddles the boundary the common prefix stops before it, so a straddling token at an
    assistant start is trained on (it contains assistant text) and one at its end is not.
    """
    return _common_prefix(_encode(tokenizer, full[:pos]), full_ids)


def tokenize_chat(tokenizer: PreTrainedTokenizerBase, messages: Messages, max_seq_len: int) -> Example:
    ensure_chat_template(tokenizer)
    full = _render(tokenizer, messages, False)
    ids = _encode(tokenizer, full)
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in _assistant_char_spans(tokenizer, messages, full):
        a = _token_index(tokenizer, full, ids, start)
        b = _token_index(tokenizer, full, ids, end) if end < len(full) else len(ids)
        labels[a:b] = ids[a:b]
    return Example(ids[:max_seq_len], labels[:max_seq_len])


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str, max_seq_len: int) -> Example:
    """Causal LM on a plain line: BOS if the tokenizer adds one, always EOS (so packing separates)."""
    ids = list(tokenizer(text)["input_ids"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    ids = ids[:max_seq_len]
    return Example(ids, list(ids))


def tokenize_rows(
    tokenizer: PreTrainedTokenizerBase, rows: list[Row], max_seq_len: int, source: str = "dataset"
) -> list[Example]:
    """Tokenize every row; rows left with nothing to learn (prompt longer than max_seq_len) are dropped
    with a warning, and if none is left the error names the first few of them."""
    examples: list[Example] = []
    dropped: list[LineError] = []
    for row in rows:
        if not has_answer(row):
            dropped.append(LineError(line=row.line, message="no assistant text to learn from"))
            continue
        try:
            if row.text is not None:
                ex = tokenize_text(tokenizer, row.text, max_seq_len)
            else:
                ex = tokenize_chat(tokenizer, row.messages or [], max_seq_len)
        except RowProblem as e:
            raise DatasetRowsError(f"line {row.line}: {e}", [LineError(line=row.line, message=str(e))]) from None
        if ex.trainable < (2 if row.text is not None else 1):
            dropped.append(LineError(line=row.line, message=f"no trainable tokens within max_seq_len "
                                                            f"{max_seq_len}"))
            continue
        ex.lines = [row.line]
        examples.append(ex)
    if dropped:
        log.warning("dropped %d of %d rows with nothing to train on within max_seq_len=%d (lines %s)",
                    len(dropped), len(rows), max_seq_len, [e.line for e in dropped[:10]])
    if not examples:
        raise _rows_error(Path(source), "training data", dropped[:MAX_REPORTED_ERRORS], len(dropped),
                          len(rows))
    return examples


# --------------------------------------------------------------------------- split, pack, batch


def split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministic train/validation split by seed (validation keeps at least one example if asked)."""
    if fraction <= 0 or len(examples) < 2:
        return list(examples), []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [examples[i] for i in train], [examples[i] for i in val]


def pack(examples: list[Example], block: int) -> list[Example]:
    """Pack whole examples into sequences of at most `block` tokens, best-fit decreasing.

    Examples are never cut: with "concatenate and chunk" an answer split across two blocks is trained
    without its prompt in the second one (TRL moved its SFT default to best-fit for that reason). With
    many short examples the blocks come out nearly full, so the padding left is a few percent at most.
    Labels keep their masks; each example's first label is masked and its positions restart at 0, so
    examples stay independent inside a block (see module docstring). Deterministic for a given input.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), kept sorted: best fit = first that fits
    for i in order:
        n = len(examples[i])
        j = bisect.bisect_left(free, (n, -1))
        if j == len(free):
            bins.append([i])
            left, b = block - n, len(bins) - 1
        else:
            space, b = free.pop(j)
            bins[b].append(i)
            left = space - n
        if left > 0:
            bisect.insort(free, (left, b))
    return [_concat([examples[i] for i in sorted(members)]) for members in bins]


def _concat(members: list[Example]) -> Example:
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    lines: list[int] = []
    for ex in members:
        ids += ex.input_ids
        labels += [IGNORE_INDEX, *ex.labels[1:]]
        pos += range(len(ex))
        lines += ex.lines
    return Example(ids, labels, pos, lines)


def prepare(
    tokenizer: PreTrainedTokenizerBase, path: Path, fmt: str, max_seq_len: int, validation_split: float,
    seed: int, packing: bool,
) -> tuple[list[Example], list[Example]]:
    """The whole pipeline: (train, validation) sequences ready for `batches`/`to_tensors`."""
    examples = tokenize_rows(tokenizer, read_rows(path, fmt), max_seq_len, Path(path).name)
    train, val = split(examples, validation_split, seed)
    if packing:
        train, val = pack(train, max_seq_len), pack(val, max_seq_len) if val else []
    return train, val


def batch_order(n_items: int, batch_size: int, order_seed: int, shuffle: bool = True) -> list[list[int]]:
    """Indices of each batch for one epoch; the same `order_seed` always gives the same batches."""
    order = list(range(n_items))
    if shuffle:
        random.Random(order_seed).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n_items, batch_size)]


def num_batches(n_items: int, batch_size: int) -> int:
    return math.ceil(n_items / batch_size)


def to_tensors(items: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest sequence.

    Unpacked batches get an attention mask. Packed batches get `position_ids` and no attention mask (that
    is what makes transformers build the per-example mask); the little padding left after a block is then
    its own sequence starting at position 0, with no labels, that no real token attends to.
    """
    import torch

    width = max(len(x) for x in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    packed = items[0].position_ids is not None
    extra = torch.zeros((len(items), width), dtype=torch.long)
    for i, x in enumerate(items):
        n = len(x)
        input_ids[i, :n] = torch.tensor(x.input_ids)
        labels[i, :n] = torch.tensor(x.labels)
        if packed:
            extra[i, :n] = torch.tensor(x.position_ids)
            extra[i, n:] = torch.arange(width - n)
        else:
            extra[i, :n] = 1
    key = "position_ids" if packed else "attention_mask"
    return {"input_ids": input_ids, "labels": labels, key: extra}


def real_tokens(items: Sequence[Example]) -> int:
    return sum(len(x) for x in items)


def iter_batches(items: list[Example], batch_size: int) -> Iterator[list[Example]]:
    """Fixed-order batches (evaluation)."""
    for i in range(0, len(items), batch_size):
        yield items[i : i + batch_size]
