"""The tiny model's export artifacts (base, adapter, merged, their GGUFs), built once per folder and shared by
the export unit tests and the Ollama stand-in's stack tests (`tests/` is on pytest's path via conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class TinyArtifacts:
    converters: Path
    base_dir: Path
    adapter_dir: Path
    merged_dir: Path
    base_gguf: Path
    adapter_gguf: Path
    merged_gguf: Path


def converters_dir() -> Path:
    from core.settings import Settings
    from handlers.export.llamacpp import ensure_converters

    return ensure_converters(Settings(_env_file=None, home=ROOT / ".codetune"))


def make_adapter(base_dir: Path, out_dir: Path, seed: int = 1) -> Path:
    """A LoRA adapter on q/v projections with random non-zero B matrices (so it changes outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    peft_model.save_pretrained(out_dir)
    return out_dir


def tiny_artifacts(root: Path) -> TinyArtifacts:
    """Build (once per `root`) the tiny model, an adapter, the merged model and their GGUFs."""
    from devkit.tinymodel import build_tiny_llama
    from handlers.export.gguf import convert_adapter, convert_base, merge_adapter

    conv = converters_dir()
    a = TinyArtifacts(conv, root / "base", root / "adapter", root / "merged", root / "base.f16.gguf",
                      root / "adapter.f16.gguf", root / "merged.f16.gguf")
    if a.merged_gguf.is_file():
        return a
    build_tiny_llama(a.base_dir)
    make_adapter(a.base_dir, a.adapter_dir)
    convert_base(a.base_dir, a.base_gguf, "f16", converters_dir=conv)
    convert_adapter(a.adapter_dir, a.base_dir, a.adapter_gguf, "f16", converters_dir=conv)
    merge_adapter(a.base_dir, a.adapter_dir, a.merged_dir)
    convert_base(a.merged_dir, a.merged_gguf, "f16", converters_dir=conv)
    return a


