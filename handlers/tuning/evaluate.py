"""Base vs tuned on the same held-out rows: loss, token accuracy and greedy sample answers.

Run by the tuning stage right after training, on the adapter it is about to publish. The held-out rows
are the job's own validation split (the same rows, by seed, as `data.prepare` held out), or its training
rows when it has none (the report says which). One model is loaded: the base with the adapter on top;
the base's numbers are taken with the adapter disabled (`peft`'s `disable_adapter()`), so both runs see
identical weights apart from the LoRA deltas.

Memory: a 49k-token vocabulary makes full logits the largest tensor by far, so scoring never builds
`batch * seq * vocab` logits. It runs the decoder, keeps the hidden states at the labelled positions only
and applies the output head to those (a few hundred rows), in batches of `SCORE_BATCH` sequences.

No broker, database or bucket here: `evaluate()` is a plain function the runner calls in a thread.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from events.payloads import EvalSample, EvalScores, Hyperparameters
from handlers.tuning import data as D

log = logging.getLogger("codetune.tuning.evaluate")

SCORE_BATCH = 2
MAX_TEXT = 4000
# end-of-turn markers of common chat templates: generation stops at any that is a single token
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>")


@dataclass
class Evaluation:
    source: str
    rows: int
    base: EvalScores
    tuned: EvalScores
    samples: list[EvalSample]
    duration_s: float


def heldout(tokenizer: Any, dataset_path: Path, fmt: str, hp: Hyperparameters, max_rows: int,
            eval_data: tuple[Path, str] | None = None) -> tuple[str, list[D.Example], dict[int, D.Row]]:
    """The request's eval file (every row), else the rows training held out (unpacked), else the training
    rows when there was no validation split."""
    if eval_data is not None:
        rows = D.read_rows(Path(eval_data[0]), eval_data[1])
        examples = D.tokenize_rows(tokenizer, rows, hp.max_seq_len, Path(eval_data[0]).name)
        return "eval_file", examples[:max_rows], {r.line: r for r in rows}
    rows = D.read_rows(Path(dataset_path), fmt)
    examples = D.tokenize_rows(tokenizer, rows, hp.max_seq_len, Path(dataset_path).name)
    train, val = D.split(examples, hp.validation_split, hp.seed)
    source, chosen = ("validation", val) if val else ("train", train)
    by_line = {r.line: r for r in rows}
    return source, chosen[:max_rows], by_line


def stop_ids(tokenizer: Any, model: Any) -> list[int]:
    """Token ids that end an answer: the eos ids of the generation config and tokenizer, and the
    template's end-of-turn marker when it is a single token."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return sorted(ids)


def _decoder_and_head(model: Any) -> tuple[Any, Any]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix), base.get_output_embeddings()


@torch.no_grad()
def score(model: Any, items: list[D.Example], pad_id: int, device: torch.device, autocast: Any) -> EvalScores:
    """Token-weighted loss and argmax accuracy over the labelled (answer) tokens of `items`."""
    decoder, head = _decoder_and_head(model)
    loss_sum, correct, count = 0.0, 0, 0
    for chunk in D.iter_batches(items, SCORE_BATCH):
        batch = {k: v.to(device) for k, v in D.to_tensors(chunk, pad_id).items()}
        labels = batch.pop("labels")[:, 1:]
        with autocast:
            hidden = decoder(**batch, use_cache=False).last_hidden_state[:, :-1]
        mask = labels != D.IGNORE_INDEX
        if not mask.any():
            continue
        logits = head(hidden[mask]).float()  # only labelled positions: (n_labels, vocab)
        target = labels[mask]
        loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
        correct += int((logits.argmax(-1) == target).sum().item())
        count += int(target.numel())
    if not count:
        return EvalScores()
    return EvalScores(loss=round(loss_sum / count, 6), token_accuracy=round(correct / count, 6), tokens=count)


def _prompt(tokenizer: Any, row: D.Row) -> tuple[str, list[int], list[dict[str, str]], str | None]:
    """(shown prompt, prompt ids, prompt messages, reference answer) for one held-out row."""
    if row.messages is not None:
        last = max(i for i, m in enumerate(row.messages) if m["role"] == "assistant")
        msgs = row.messages[:last]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])  # as training encoded chats
        shown = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), text)
        return shown, ids, msgs, row.messages[last]["content"]
    words = (row.text or "").split()
    head = " ".join(words[: max(1, len(words) // 2)])
    return head, list(tokenizer(head)["input_ids"]), [], " ".join(words[len(head.split()):]) or None


@torch.no_grad()
def _generate(model: Any, ids: list[int], stops: list[int], pad_id: int, device: torch.device,
              max_new_tokens: int) -> tuple[list[int], bool]:
    x = torch.tensor([ids], device=device)
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=stops or None, pad_token_id=pad_id, use_cache=True)
    new = out[0, len(ids):].tolist()
    stopped = bool(new) and new[-1] in stops
    return new, stopped


def samples(model: Any, tokenizer: Any, rows: list[D.Row], pad_id: int, device: torch.device,
            max_new_tokens: int, keep_ids: int) -> list[EvalSample]:
    stops = stop_ids(tokenizer, model)
    out = []
    for row in rows:
        shown, ids, msgs, reference = _prompt(tokenizer, row)
        with model.disable_adapter():
            base_ids, base_stopped = _generate(model, ids, stops, pad_id, device, max_new_tokens)
        tuned_ids, tuned_stopped = _generate(model, ids, stops, pad_id, device, max_new_tokens)
        content = [i for i in tuned_ids if i not in stops]
        out.append(EvalSample(
            prompt=shown[:MAX_TEXT], messages=msgs, reference=reference[:MAX_TEXT] if reference else None,
            base=tokenizer.decode(base_ids, skip_special_tokens=True).strip()[:MAX_TEXT],
            tuned=tokenizer.decode(tuned_ids, skip_special_tokens=True).strip()[:MAX_TEXT],
            base_stopped=base_stopped, tuned_stopped=tuned_stopped, tuned_tokens=len(tuned_ids),
            tuned_ids=content[:keep_ids],
        ))
    return out


def evaluate(base_dir: Path, adapter_dir: Path, dataset_path: Path, fmt: str, hp: Hyperparameters, *,
             max_rows: int = 64, max_new_tokens: int = 64, keep_ids: int = 8,
             eval_data: tuple[Path, str] | None = None) -> Evaluation:
    """Score base and tuned on the held-out rows and answer up to `hp.eval_samples` of their prompts."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from handlers.tuning.recipe import _device, _setup_threads

    started = time.perf_counter()
    _setup_threads()
    device, dtype = _device()
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)  # the tokenizer (and template) training used
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    source, items, by_line = heldout(tokenizer, dataset_path, fmt, hp, max_rows, eval_data)
    cuda = device.type == "cuda"
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype if cuda else torch.float32,
                                                attn_implementation="sdpa",
                                                device_map={"": device.index or 0} if cuda else None)
    model = PeftModel.from_pretrained(base, adapter_dir).to(device)
    model.eval()
    autocast = torch.autocast("cuda", dtype=dtype) if cuda else contextlib.nullcontext()
    with model.disable_adapter():
        base_scores = score(model, items, pad_id, device, autocast)
    tuned_scores = score(model, items, pad_id, device, autocast)
    prompt_rows = [by_line[ex.lines[0]] for ex in items[: hp.eval_samples] if ex.lines]
    answers = samples(model, tokenizer, prompt_rows, pad_id, device, max_new_tokens, keep_ids)
    del model, base
    return Evaluation(source=source, rows=len(items), base=base_scores, tuned=tuned_scores, samples=answers,
                      duration_s=round(time.perf_counter() - started, 3))
