"""Portable artifacts: what a job publishes names the hub repo id and revision, never a worker's folder.

The tiny model is trained from a plain local folder (as a worker trains from its mirror of the bucket),
then that folder is deleted: the adapter must still load on "another machine" through the hub id and
revision alone (`AutoPeftModelForCausalLM`, offline from a hub cache), and its GGUFs must say the same.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from devkit.tinymodel import build_tiny_llama, toy_dataset
from events.payloads import Hyperparameters
from handlers.export.gguf import convert_adapter, convert_base, merge_adapter
from handlers.tuning.recipe import NullHooks, train
from infra.hubcache import install_in_hub_cache

pytestmark = pytest.mark.slow
REPO = "codetune-test/portable-llama"


def _no_path_in(folder: Path, *paths: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            text = f.read_bytes()
            for p in paths:
                assert str(p).encode() not in text, f"{f.name} names the local folder {p}"


def test_adapter_and_ggufs_name_the_hub_repo_and_revision(tmp_path: Path) -> None:
    from peft import AutoPeftModelForCausalLM

    from devkit.gguf_info import read_gguf_info
    from tests.unit.test_export import converters_dir

    built = build_tiny_llama(tmp_path / "build")
    cache = tmp_path / "hub"
    revision = install_in_hub_cache(built, cache, REPO)
    worker_copy = tmp_path / "worker" / "models" / "mirror"  # what a worker trains from
    shutil.copytree(built, worker_copy)
    data = toy_dataset(tmp_path / "chat.jsonl", "chat", rows=16)
    hp = Hyperparameters(max_steps=2, batch_size=4, max_seq_len=64, validation_split=0.0)
    adapter = train(worker_copy, data, "chat", hp, tmp_path / "worker" / "out", NullHooks(), None, base=
                    (REPO, revision)).adapter_dir

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == (REPO, revision)
    card = (adapter / "README.md").read_text()
    assert f"base_model: {REPO}" in card and f"base_model:adapter:{REPO}" in card
    _no_path_in(adapter, worker_copy, tmp_path)

    # the GGUFs: base named by its repo id, adapter and merged naming the base repo at that revision
    conv, src = converters_dir(), (REPO, revision)
    out = tmp_path / "export"
    base_gguf = convert_base(worker_copy, out / "base.gguf", converters_dir=conv, source=src)
    lora_gguf = convert_adapter(adapter, worker_copy, out / "adapter.gguf", converters_dir=conv, source=src,
                                name="zorblat-tune")
    merged = merge_adapter(worker_copy, adapter, out / "merged")
    merged_gguf = convert_base(merged, out / "merged.gguf", converters_dir=conv, source=src, name="zorblat-tune")
    base, lora, tuned = (read_gguf_info(p).kv for p in (base_gguf, lora_gguf, merged_gguf))
    assert base["general.name"] == REPO
    assert base["general.source.url"] == f"https://huggingface.co/{REPO}/tree/{revision}"
    for kv in (lora, tuned):
        assert kv["general.name"] == "zorblat-tune"
        assert kv["general.base_model.0.repo_url"] == f"https://huggingface.co/{REPO}"
        assert kv["general.base_model.0.url"] == f"https://huggingface.co/{REPO}/tree/{revision}"
        assert kv["general.base_model.0.version"] == revision
    for kv in (base, lora, tuned):
        assert not any(str(tmp_path) in str(v) or "mirror" in str(v) for v in kv.values() if isinstance(v, str))
    assert not list(out.glob(".*"))  # no staging folders left behind

    # "another machine": the worker's folder is gone; the adapter alone resolves its base from the hub id
    shutil.rmtree(worker_copy)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(adapter, cache_dir=cache, local_files_only=True)
    assert model.get_base_model().name_or_path == REPO
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(built), adapter)
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, reference(input_ids=ids).logits)
