"""The CPU LoRA dropout behaves as `nn.Dropout`: rate, scale, expectation, gradient, seeding, eval."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

import torch

from devkit.tinymodel import build_tiny_llama
from events.payloads import Hyperparameters
from handlers.tuning.dropout import FastDropout
from handlers.tuning.recipe import _load_model


def test_drops_at_rate_p_and_keeps_the_expectation() -> None:
    torch.manual_seed(0)
    x = torch.ones(1000, 1000)
    y = FastDropout(0.05)(x)
    dropped = (y == 0).float().mean().item()
    assert dropped == pytest.approx(0.05, abs=0.002)
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - 0.05)), rtol=1e-4)
    assert y.mean().item() == pytest.approx(1.0, abs=0.005)


def test_gradient_is_the_same_mask() -> None:
    torch.manual_seed(1)
    x = torch.randn(64, 32, requires_grad=True)
    y = FastDropout(0.3)(x)
    y.sum().backward()
    assert x.grad is not None
    dropped = y == 0
    assert torch.all(x.grad[dropped] == 0) and 0.2 < dropped.float().mean().item() < 0.4
    assert torch.allclose(x.grad[~dropped], torch.full_like(x.grad[~dropped], 1 / 0.7), rtol=1e-3)


def test_masks_follow_torch_seed_and_differ_between_calls() -> None:
    drop, x = FastDropout(0.5), torch.ones(32, 32)
    torch.manual_seed(3)
    a, b = drop(x), drop(x)
    torch.manual_seed(3)
    assert torch.equal(drop(x), a) and not torch.equal(a, b)


def test_eval_mode_and_zero_p_are_the_identity() -> None:
    x = torch.randn(8, 8)
    assert torch.equal(FastDropout(0.5).eval()(x), x)
    assert torch.equal(FastDropout(0.0)(x), x)
    with pytest.raises(ValueError):
        FastDropout(1.0)


def test_the_recipe_puts_it_in_front_of_every_lora_module_on_cpu(tmp_path: Path) -> None:
    base = build_tiny_llama(tmp_path / "model")
    model = _load_model(base, Hyperparameters(lora_dropout=0.1), torch.device("cpu"), torch.float32)
    drops = [d for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)
             for d in m.lora_dropout.values()]
    assert drops and all(type(d) is FastDropout and d.p == 0.1 for d in drops)
