"""The tuning data module and training recipe on the tiny local Llama (CPU, seconds per test)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

import torch

from core.errors import DatasetFormatError, HyperparameterError, InvalidInputError
from devkit.tinymodel import build_tiny_llama, toy_dataset
from events.payloads import Hyperparameters, LossPoint
from handlers.tuning import data as D
from handlers.tuning.recipe import (
    NullHooks,
    StepInfo,
    find_checkpoint,
    plot_loss,
    thin_history,
    train,
)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tok(base_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir)


@pytest.fixture(scope="module")
def chat_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return toy_dataset(tmp_path_factory.mktemp("data") / "chat.jsonl", "chat", rows=64)


def _hp(**kw: Any) -> Hyperparameters:
    base: dict[str, Any] = dict(max_steps=12, batch_size=4, max_seq_len=128, learning_rate=1e-2,
                                target_modules="all-linear", eval_steps=4, save_steps=4, warmup_ratio=0.1,
                                validation_split=0.1, seed=7)
    return Hyperparameters(**(base | kw))


class Recorder(NullHooks):
    """Records steps/checkpoints; optionally stops (cancel) or raises (crash) after a given step."""

    def __init__(self, stop_after: int | None = None, crash_at: int | None = None) -> None:
        self.infos: list[StepInfo] = []
        self.checkpoints: list[int] = []
        self.stop_after, self.crash_at = stop_after, crash_at

    def on_step(self, info: StepInfo) -> None:
        if info.step == self.crash_at:
            raise RuntimeError("simulated worker crash")
        self.infos.append(info)

    def on_checkpoint(self, ckpt_dir: Path, step: int) -> None:
        assert (ckpt_dir / "adapter_model.safetensors").is_file()
        self.checkpoints.append(step)

    def should_stop(self) -> bool:
        return self.stop_after is not None and any(i.step >= self.stop_after for i in self.infos)


def _write(tmp_path: Path, name: str, lines: list[str | dict[str, Any]]) -> Path:
    p = tmp_path / name
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return p


# --------------------------------------------------------------------------- data


def test_chat_labels_cover_only_assistant_turns(tok: Any) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"},
            {"role": "assistant", "content": "Lima."}, {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": "You are welcome."}]
    ex = D.tokenize_chat(tok, msgs, 512)
    trained = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != D.IGNORE_INDEX])
    masked = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab == D.IGNORE_INDEX])
    assert trained == "Lima.<|im_end|>\nYou are welcome.<|im_end|>\n"  # end-of-turn is learned: it stops
    assert masked == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of Peru?<|im_end|>\n"
                      "<|im_start|>assistant\n<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n")
    assert ex.input_ids == tok.apply_chat_template(msgs, return_dict=False)


def test_alpaca_renders_as_chat_and_masks_the_prompt(tok: Any, tmp_path: Path) -> None:
    path = _write(tmp_path, "a.jsonl", [{"instruction": "Name the capital.", "input": "Chile",
                                         "output": "Santiago."}])
    (ex,) = D.tokenize_rows(tok, D.read_rows(path, "alpaca"), 512)
    masked = [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab == D.IGNORE_INDEX]
    prompt = [{"role": "user", "content": "Name the capital.\n\nChile"}]
    assert tok.decode(masked) == tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    assert tok.decode([x for x in ex.labels if x != D.IGNORE_INDEX]) == "Santiago.<|im_end|>\n"


def test_text_trains_on_every_token_and_ends_with_eos(tok: Any, tmp_path: Path) -> None:
    path = _write(tmp_path, "t.txt", ["The sky is blue.", "", "The snow is white."])
    rows = D.read_rows(path, "text")
    assert [r.line for r in rows] == [1, 3]  # blank lines are skipped, line numbers kept
    examples = D.tokenize_rows(tok, rows, 512)
    assert all(ex.labels == ex.input_ids and ex.input_ids[-1] == tok.eos_token_id for ex in examples)
    assert all(len(ex) <= 5 for ex in D.tokenize_rows(tok, rows, 5))  # truncation


def test_packing_keeps_examples_whole_and_barely_pads(tok: Any, chat_path: Path) -> None:
    examples = D.tokenize_rows(tok, D.read_rows(chat_path, "chat"), 128)
    blocks = D.pack(examples, 256)
    assert all(len(b) <= 256 for b in blocks)
    assert sum(map(len, blocks)) == sum(map(len, examples))  # nothing dropped, nothing added
    # every example sits unsplit in one block, positions restarting at 0, first label masked
    starts = sum(1 for b in blocks for p in b.position_ids or [] if p == 0)
    assert starts == len(examples)
    assert sum(b.trainable for b in blocks) == sum(ex.trainable - (ex.labels[0] != -100) for ex in examples)
    fill = sorted(len(b) / 256 for b in blocks)
    assert fill[1] > 0.9  # only the leftover block is not nearly full (padding < 10% per block)
    batch = D.to_tensors(blocks[:4], tok.pad_token_id)
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
    assert (batch["input_ids"] == tok.pad_token_id).sum() == 4 * batch["input_ids"].shape[1] - sum(
        len(b) for b in blocks[:4])


def test_packed_examples_do_not_attend_to_each_other(base_dir: Path, tok: Any, chat_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    examples = D.tokenize_rows(tok, D.read_rows(chat_path, "chat"), 128)[:3]
    (block,) = D.pack(examples, 512)  # one block, examples in their original order
    packed = D.to_tensors([block], tok.pad_token_id)
    with torch.no_grad():
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                         use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([ex.input_ids])).logits[0] for ex in examples])
    assert torch.allclose(together, alone, atol=1e-4)


def test_split_is_deterministic_by_seed(tok: Any, chat_path: Path) -> None:
    examples = D.tokenize_rows(tok, D.read_rows(chat_path, "chat"), 128)
    a_train, a_val = D.split(examples, 0.25, seed=1)
    _, b_val = D.split(examples, 0.25, seed=1)
    _, c_val = D.split(examples, 0.25, seed=2)
    assert len(a_val) == 16 and len(a_train) == 48
    assert [e.lines for e in a_val] == [e.lines for e in b_val] != [e.lines for e in c_val]
    assert D.batch_order(10, 4, 3) == D.batch_order(10, 4, 3) != D.batch_order(10, 4, 4)


def test_bad_rows_are_named_by_line(tmp_path: Path) -> None:
    good = {"instruction": "Say hi.", "output": "Hi."}
    path = _write(tmp_path, "bad.jsonl", [good, good, "{not json", good, {"instruction": "x"}, good])
    with pytest.raises(DatasetFormatError) as err:
        D.read_rows(path, "alpaca")
    assert [e.line for e in err.value.line_errors] == [3, 5]  # type: ignore[attr-defined]
    assert "line 3: invalid JSON" in err.value.message and "line 5: missing required key 'output'" in str(
        err.value)
    assert err.value.code == "invalid_dataset"

    chat = _write(tmp_path, "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DatasetFormatError, match="line 1: no assistant message"):
        D.read_rows(chat, "chat")
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"fine\n\xff\xfe oops\n")
    with pytest.raises(DatasetFormatError, match="line 2: not valid UTF-8"):
        D.read_rows(binary, "text")
    with pytest.raises(DatasetFormatError, match="empty"):
        D.read_rows(_write(tmp_path, "e.txt", ["", "  "]), "text")


def test_rows_with_nothing_left_to_learn_fail_clearly(tok: Any, chat_path: Path) -> None:
    with pytest.raises(DatasetFormatError, match="no trainable tokens within max_seq_len 8"):
        D.tokenize_rows(tok, D.read_rows(chat_path, "chat"), 8, chat_path.name)


# --------------------------------------------------------------------------- training


def test_training_learns_and_saves_a_self_describing_adapter(
    base_dir: Path, chat_path: Path, tmp_path: Path
) -> None:
    hooks = Recorder()
    result = train(base_dir, chat_path, "chat", _hp(max_steps=24, eval_steps=8, save_steps=100), tmp_path,
                   hooks)
    m = result.metrics
    assert m.steps == 24 and not result.cancelled and not result.stopped_early
    assert m.first_loss is not None and m.train_loss is not None and m.train_loss < m.first_loss - 1.0
    assert m.eval_loss is not None and m.tokens > 0 and m.tokens_per_s > 0
    assert [p.step for p in result.loss_history] == list(range(1, 25))
    assert [p.step for p in result.loss_history if p.eval_loss is not None] == [8, 16, 24]
    assert len([i for i in hooks.infos if i.eval_loss is not None]) == 3
    assert hooks.infos[-1].eta_s == 0 and 0 < hooks.infos[1].learning_rate <= 1e-2  # step 1: warmup from 0
    names = {p.name for p in result.adapter_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.model",
            "tokenizer_config.json"} <= names
    png = plot_loss(result.loss_history, tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unpacked_training_counts_only_real_tokens(base_dir: Path, chat_path: Path, tmp_path: Path) -> None:
    hp = _hp(max_steps=3, packing=False, validation_split=0)
    result = train(base_dir, chat_path, "chat", hp, tmp_path, NullHooks())
    assert result.metrics.steps == 3 and result.metrics.eval_loss is None
    assert 3 * 4 * 20 < result.metrics.tokens < 3 * 4 * 128  # 12 short chats: no padding counted


def test_resume_after_crash_continues_to_the_same_end(base_dir: Path, chat_path: Path, tmp_path: Path) -> None:
    hp = _hp(max_steps=10, save_steps=4, eval_steps=5)
    whole = train(base_dir, chat_path, "chat", hp, tmp_path / "whole", NullHooks())

    crashing = Recorder(crash_at=7)
    with pytest.raises(RuntimeError, match="simulated"):
        train(base_dir, chat_path, "chat", hp, tmp_path / "run", crashing)
    assert crashing.checkpoints == [4]
    ckpt = find_checkpoint(tmp_path / "run")
    assert ckpt is not None and ckpt.name == "step-4"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert {"epoch", "batch_index", "order_seed", "micro_batches", "rng", "history"} <= state.keys()

    after = Recorder()
    resumed = train(base_dir, chat_path, "chat", hp, tmp_path / "run", after, resume_dir=tmp_path / "run")
    assert after.infos[0].step == 5 and resumed.metrics.resumed_from_step == 4
    assert resumed.metrics.steps == whole.metrics.steps == 10
    assert [p.step for p in resumed.loss_history] == list(range(1, 11))
    for a, b in zip(whole.loss_history, resumed.loss_history, strict=True):  # same data order and RNG
        assert a.loss == pytest.approx(b.loss, rel=1e-5)
        assert (a.eval_loss is None) == (b.eval_loss is None)
    assert resumed.metrics.tokens == whole.metrics.tokens

    with pytest.raises(InvalidInputError, match="another run"):
        train(base_dir, chat_path, "chat", _hp(max_steps=10, batch_size=2), tmp_path / "x", NullHooks(),
              resume_dir=ckpt)


def test_should_stop_cancels_at_the_next_step(base_dir: Path, chat_path: Path, tmp_path: Path) -> None:
    hooks = Recorder(stop_after=3)
    result = train(base_dir, chat_path, "chat", _hp(max_steps=50), tmp_path, hooks)
    assert result.cancelled and result.metrics.steps == 3 and len(result.loss_history) == 3


def test_early_stopping_on_eval_loss(base_dir: Path, chat_path: Path, tmp_path: Path) -> None:
    # A learning rate of 0.5 wrecks the model: its eval loss wobbles instead of improving steadily, and a
    # patience of 1 stops at the first eval that is no better. (Patience 2 needs two bad evals in a row,
    # which float summation order alone may or may not produce; at lr 1.0 the first Adam step is ±lr on
    # every weight, so summation order decides where the whole run goes.)
    hp = _hp(max_steps=40, eval_steps=1, early_stopping_patience=1, learning_rate=0.5, warmup_ratio=0)
    result = train(base_dir, chat_path, "chat", hp, tmp_path, NullHooks())
    assert result.stopped_early and result.metrics.steps < 40
    evals = [p.eval_loss for p in result.loss_history if p.eval_loss is not None]
    assert result.metrics.eval_loss == min(evals)  # the best adapter is the one shipped

    with pytest.raises(HyperparameterError, match="early_stopping_patience"):
        train(base_dir, chat_path, "chat", _hp(early_stopping_patience=2, validation_split=0), tmp_path,
              NullHooks())


def test_thin_history_keeps_evals_and_ends() -> None:
    history = [LossPoint(step=i, loss=1.0, eval_loss=0.5 if i % 100 == 0 else None) for i in range(1, 2001)]
    thin = thin_history(history, 200)
    assert len(thin) <= 221 and thin[-1].step == 2000
    assert {p.step for p in thin if p.eval_loss is not None} == set(range(100, 2001, 100))
