"""The chunked LM-head loss is the plain full-logits loss: same value, same LoRA gradients (tiny Llama, CPU)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

import torch
import torch.nn.functional as F

from devkit.tinymodel import build_tiny_llama, toy_dataset
from events.payloads import Hyperparameters
from handlers.tuning import data as D
from handlers.tuning.loss import LinearCrossEntropy, causal_lm, chunk_rows, token_loss_sum
from handlers.tuning.packed import segments
from handlers.tuning.recipe import _load_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, torch.Tensor]]:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("loss")
    base = build_tiny_llama(root / "model")
    tok = AutoTokenizer.from_pretrained(base)
    train, _ = D.prepare(tok, toy_dataset(root / "chat.jsonl", "chat", rows=24), "chat", 128, 0, 0, True)
    hp = Hyperparameters(lora_dropout=0.0, seed=0)
    torch.manual_seed(0)
    model = _load_model(base, hp, torch.device("cpu"), torch.float32)
    for name, p in model.named_parameters():  # LoRA B starts at zero: make the adapter do something
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model, D.to_tensors(train[:3], tok.eos_token_id)


def _lora_grads(model: Any) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def _plain(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=D.IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("chunk_bytes", [4 * 512 * 7, 1 << 27])  # 7-token chunks (many, ragged) and one
def test_chunked_loss_equals_plain_loss_and_gradients(setup: tuple[Any, dict[str, torch.Tensor]],
                                                      chunk_bytes: int) -> None:
    model, batch = setup
    assert (batch["labels"] == D.IGNORE_INDEX).any() and (batch["labels"] != D.IGNORE_INDEX).any()
    plain = _plain(model, batch)
    plain.backward()
    want = _lora_grads(model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    chunked = token_loss_sum(model, inputs, batch["labels"], chunk_bytes=chunk_bytes)
    chunked.backward()
    got = _lora_grads(model)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-4)
    assert want.keys() == got.keys() and len(got) > 0
    for name in want:
        # fp32 sums in another order differ by rounding relative to the tensor's scale, not each element's
        # (which CPU kernel runs decides that order); a wrong mask or chunk is off by the gradient itself
        scale = want[name].abs().max().item()
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6 * scale, msg=name)
    assert any(g.abs().sum() > 0 for g in got.values())


def test_chunked_loss_without_gradients_keeps_nothing_for_backward(
        setup: tuple[Any, dict[str, torch.Tensor]]) -> None:
    model, batch = setup
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        value = token_loss_sum(model, inputs, batch["labels"], chunk_bytes=4 * 512 * 7)
        assert value.grad_fn is None
        torch.testing.assert_close(value, _plain(model, batch), rtol=1e-5, atol=1e-4)


def test_linear_cross_entropy_trains_the_head_weight_too() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    assert chunk_rows(50, 4 * 50 * 5) == 16  # never below 16 tokens a chunk
    torch.autograd.gradcheck(lambda h, w: LinearCrossEntropy.apply(h, w, targets, 5), (hidden, weight))


@pytest.fixture(scope="module")
def long_rows(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Two packed rows of up to 512 tokens: several examples each, of different lengths."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("packed")
    tok = AutoTokenizer.from_pretrained(build_tiny_llama(root / "model"))
    train, _ = D.prepare(tok, toy_dataset(root / "chat.jsonl", "chat", rows=24), "chat", 512, 0, 0, True)
    return D.to_tensors(train[:2], tok.eos_token_id)


def test_packed_rows_attend_example_by_example(setup: tuple[Any, dict[str, torch.Tensor]],
                                               long_rows: dict[str, torch.Tensor]) -> None:
    """Each example of a packed row gets the hidden states (and gradients) it gets alone, and the layout
    covers every token once even with examples of very different lengths (several SDPA groups)."""
    model, batch = setup[0], long_rows
    position_ids = batch["position_ids"]
    layout = segments(position_ids)
    assert len(layout.groups) > 1
    assert sorted(layout.inverse.tolist()) == list(range(position_ids.numel()))
    decoder = causal_lm(model).get_decoder()
    packed = decoder(input_ids=batch["input_ids"], position_ids=position_ids, use_cache=False,
                     segments=layout).last_hidden_state
    row = int((position_ids == 0).sum(1).argmax())  # the row holding the most examples
    packed[row].sum().backward()
    want = _lora_grads(model)
    ids, pos = batch["input_ids"][row], position_ids[row]
    starts = [*torch.nonzero(pos == 0).squeeze(1).tolist(), len(pos)]
    assert len(starts) > 3  # several examples (and maybe the padding after them) share the row
    alone = torch.cat([decoder(input_ids=ids[None, a:b], use_cache=False).last_hidden_state[0]
                       for a, b in itertools.pairwise(starts)])
    alone.sum().backward()
    got = _lora_grads(model)
    torch.testing.assert_close(packed[row], alone, rtol=1e-4, atol=1e-5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4, msg=name)
