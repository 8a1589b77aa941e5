"""The tiny local Llama: builds deterministically, loads with transformers, resolves from a hub cache."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sentencepiece")

from devkit.tinymodel import IM_END, build_tiny_llama, toy_dataset
from infra.hubcache import install_in_hub_cache

REPO_ID = "codetune-demo/tiny-llama"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def _digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def test_files_and_config(tiny_dir: Path) -> None:
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"tokenizer.model", "tokenizer_config.json", "config.json", "model.safetensors",
            "generation_config.json"} <= names
    tcfg = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert tcfg["tokenizer_class"] == "LlamaTokenizer"
    assert tcfg["eos_token"] == IM_END and tcfg["pad_token"] != tcfg["eos_token"]
    assert "add_generation_prompt" in tcfg["chat_template"]


def test_tokenizer_roundtrip_and_chat_template(tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert len(tok) == 512
    text = "The capital of France is Paris.\n  héllo 😀 123"
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The sky is blue."}]
    ids = tok.apply_chat_template(msgs, return_dict=False)
    # Each turn ends with the eos token: generation stops at end of turn.
    assert ids.count(tok.eos_token_id) == 2
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == IM_END
    prompt = tok.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_model_loads_and_generates(tiny_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert model.generation_config.eos_token_id == [model.config.eos_token_id]
    out = model.generate(torch.tensor([[1, 10, 11]]), max_new_tokens=4, do_sample=False)
    assert out.shape[1] <= 7


def test_deterministic_for_seed(tiny_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_llama(tmp_path / "again")
    assert _digests(again) == _digests(tiny_dir)


def test_snapshot_download_resolves_offline(tiny_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    sha = install_in_hub_cache(tiny_dir, cache, REPO_ID)
    assert len(sha) == 40 and sha == install_in_hub_cache(tiny_dir, cache, REPO_ID)  # idempotent
    # HF_HUB_OFFLINE is read when huggingface_hub is imported: use a fresh interpreter, as a stage would.
    code = ("import sys; from huggingface_hub import snapshot_download; "
            "print(snapshot_download(sys.argv[1], cache_dir=sys.argv[2]))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code, REPO_ID, str(cache)], env=env, check=True,
                         capture_output=True, text=True, timeout=60).stdout.strip()
    snap = Path(out)
    assert snap.name == sha
    assert (cache / "models--codetune-demo--tiny-llama" / "refs" / "main").read_text() == sha
    assert _digests(snap) == _digests(tiny_dir)
    assert all((snap / n).is_symlink() for n in _digests(tiny_dir))


@pytest.mark.parametrize("fmt", ["text", "alpaca", "chat"])
def test_toy_dataset_formats(fmt: str, tmp_path: Path) -> None:
    path = toy_dataset(tmp_path / f"toy.{fmt}", fmt, rows=20, seed=3)  # type: ignore[arg-type]
    lines = path.read_text().splitlines()
    assert len(lines) == 20
    assert path.read_text() == toy_dataset(tmp_path / "again", fmt, rows=20, seed=3).read_text()  # type: ignore[arg-type]
    if fmt == "alpaca":
        assert all({"instruction", "input", "output"} <= json.loads(x).keys() for x in lines)
    elif fmt == "chat":
        assert all(json.loads(x)["messages"][-1]["role"] == "assistant" for x in lines)
