"""HF checkpoints and LoRA adapters → GGUF with llama.cpp's own converters; LoRA merge with peft.

Plain functions (no broker, database or bucket): each converter runs as a subprocess of this Python
(`sys.executable`, so it sees the same torch/transformers) with a timeout and captured output. A failure
raises `ExportError` carrying the converter's last error lines. Outputs are written under a temporary
name in the destination folder and renamed into place only after the converter succeeded and the file
starts with the GGUF magic, so a crash or timeout never leaves a half-written artifact behind.

Portable metadata: given `source` (the hub repo id and revision the base was pulled from), every GGUF
names that repo and revision (`general.name`, `general.source.*` for a base, `general.base_model.0.*` for a
tune) instead of whatever the converters would guess from the worker's local folder names.

Output types: `f16`, `bf16`, `q8_0` (what the converters write directly; K-quants such as q4_K_M are
made by Ollama at create time from an f16 GGUF, see `ollama_ops.create_model(quantize=…)`).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

from core.errors import ExportError
from storage.local import TOKENIZER_FILES

log = logging.getLogger("codetune.export")

OutType = Literal["f16", "bf16", "q8_0"]
OUTTYPES: tuple[str, ...] = get_args(OutType)
DEFAULT_TIMEOUT_S = 3600.0
GGUF_MAGIC = b"GGUF"
BASE_SCRIPT = "convert_hf_to_gguf.py"
LORA_SCRIPT = "convert_lora_to_gguf.py"

_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
Source = tuple[str, str]  # (hub repo id, revision) a base model was pulled from
_ERROR_LINES = 12


# --------------------------------------------------------------------------- public API


def convert_base(model_dir: Path, out_path: Path, outtype: OutType = "f16", *,
                 converters_dir: Path | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 source: Source | None = None, name: str | None = None) -> Path:
    """Convert a Hugging Face model folder to one GGUF file at `out_path`; return `out_path`.

    `source`: the hub repo id and revision of the base. Without `name` the GGUF is that base (named by its
    repo id); with `name` it is a tune of it (a merged model) that names the base as its base model."""
    model_dir, out_path = Path(model_dir), Path(out_path)
    _check_outtype(outtype)
    _check_model_dir(model_dir, "model")
    args = base_args(model_dir, out_path, outtype)
    with tempfile.TemporaryDirectory(prefix=".meta-", dir=_parent(out_path)) as tmp:
        if source is not None:
            meta = Path(tmp) / "metadata.json"
            meta.write_text(json.dumps(gguf_metadata(source, name)))
            args += ["--metadata", str(meta)]
        return run_converter(BASE_SCRIPT, args, out_path, converters_dir=converters_dir, timeout_s=timeout_s,
                             what=f"model {model_dir}")


def convert_adapter(adapter_dir: Path, base_dir: Path, out_path: Path, outtype: OutType = "f16", *,
                    converters_dir: Path | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                    source: Source | None = None, name: str | None = None) -> Path:
    """Convert a peft LoRA adapter folder (trained on `base_dir`) to a GGUF LoRA; return `out_path`.

    `source`: the base's hub repo id and revision, written as the adapter's base model. The LoRA converter
    has no metadata option: it reads the adapter folder's model card, so it is given a view of the folder
    (links to its files) whose card carries exactly that metadata."""
    adapter_dir, base_dir, out_path = Path(adapter_dir), Path(base_dir), Path(out_path)
    _check_outtype(outtype)
    _check_adapter_dir(adapter_dir)
    _check_model_dir(base_dir, "base model", weights=False)
    with tempfile.TemporaryDirectory(prefix=".adapter-", dir=_parent(out_path)) as tmp:
        src = adapter_dir
        if source is not None:
            src = Path(tmp) / "adapter"
            src.mkdir()
            for f in adapter_dir.iterdir():
                if f.is_file() and f.name != "README.md":
                    (src / f.name).symlink_to(f.resolve())
            meta = gguf_metadata(source, name or f"{source[0].rsplit('/', 1)[-1]} LoRA")
            card = {"name": meta["general.name"], "base_model": meta["general.base_models"]}
            (src / "README.md").write_text(f"---\n{json.dumps(card)}\n---\n")  # YAML front matter (JSON is YAML)
        return run_converter(LORA_SCRIPT, adapter_args(src, base_dir, out_path, outtype), out_path,
                             converters_dir=converters_dir, timeout_s=timeout_s, what=f"adapter {adapter_dir}")


def gguf_metadata(source: Source, name: str | None = None) -> dict[str, Any]:
    """llama.cpp metadata overrides naming the hub repo and revision (never a local folder).

    Without `name`: the base itself (`general.name` = repo id, `general.source.url` = the revision's tree).
    With `name`: a tune called `name` whose `general.base_models` entry is that repo at that revision."""
    repo_id, revision = source
    hub = f"https://huggingface.co/{repo_id}"
    at = f"{hub}/tree/{revision}"
    if name is None:
        return {"general.name": repo_id, "general.basename": repo_id.rsplit("/", 1)[-1],
                "general.source.url": at, "general.source.repo_url": hub}
    org, _, model = repo_id.rpartition("/")
    entry = {"name": model, "repo_url": hub, "url": at, "version": revision} | ({"organization": org} if org else {})
    return {"general.name": name, "general.basename": name, "general.base_models": [entry]}


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """Merge a LoRA adapter into its base (peft `merge_and_unload`) and save a complete HF model folder.

    The folder gets the merged safetensors weights, config, generation config and the tokenizer files
    copied verbatim (base first, then any the adapter folder carries, e.g. a tuned chat template), so
    `convert_base` takes the same tokenizer path as for the base. Written to a temporary sibling folder
    and renamed to `out_dir` when complete (an existing `out_dir` is replaced). Returns `out_dir`.
    """
    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    _check_model_dir(base_dir, "base model")
    _check_adapter_dir(adapter_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _merge_into(base_dir, adapter_dir, tmp)
        copy_tokenizer_files(base_dir, tmp)
        copy_tokenizer_files(adapter_dir, tmp)
        tmp.chmod(0o755)
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def base_args(model_dir: Path, out_path: Path, outtype: str) -> list[str]:
    """Arguments of `convert_hf_to_gguf.py` (the bench runs the script by hand with exactly these)."""
    return [str(model_dir), "--outfile", str(out_path), "--outtype", outtype]


def adapter_args(adapter_dir: Path, base_dir: Path, out_path: Path, outtype: str) -> list[str]:
    """Arguments of `convert_lora_to_gguf.py`."""
    return [str(adapter_dir), "--base", str(base_dir), "--outfile", str(out_path), "--outtype", outtype]


def run_converter(script: str, args: Sequence[str], out_path: Path, *, converters_dir: Path | None = None,
                  timeout_s: float = DEFAULT_TIMEOUT_S, what: str = "") -> Path:
    """Run a llama.cpp converter writing `out_path` atomically. `args` name `out_path`; it is swapped for a
    temporary file in the same folder, renamed to `out_path` once the run succeeded and the file is GGUF."""
    from handlers.export.llamacpp import converter_env, ensure_converters

    conv = converters_dir or ensure_converters()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.stem}.{uuid.uuid4().hex[:12]}.tmp.gguf")
    cmd = [sys.executable, str(conv / script), *(str(tmp) if a == str(out_path) else a for a in args)]
    started = time.monotonic()
    try:
        proc = _run(cmd, converter_env(conv), timeout_s, script, what)
        if proc.returncode != 0:
            raise ExportError(f"{script} failed with exit code {proc.returncode} for {what or args[0]}:\n"
                              f"{error_tail(proc.stderr, proc.stdout)}")
        _check_gguf(tmp, script, proc)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("%s wrote %s (%d bytes) in %.1f s", script, out_path, out_path.stat().st_size,
             time.monotonic() - started)
    return out_path


def copy_tokenizer_files(src_dir: Path, dst_dir: Path) -> list[str]:
    """Copy the tokenizer files present in `src_dir` to `dst_dir` (overwriting); return their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, dst_dir / name)
            copied.append(name)
    return copied


def error_tail(stderr: str, stdout: str = "", lines: int = _ERROR_LINES) -> str:
    """The last meaningful lines of a converter's output (progress bars dropped)."""
    text = stderr if stderr.strip() else stdout
    kept = [ln.rstrip() for ln in text.replace("\r", "\n").splitlines()
            if ln.strip() and not ln.lstrip().startswith(("Writing:", "Loading weights"))]
    return "\n".join(kept[-lines:]) or "(no output)"


# --------------------------------------------------------------------------- internals


def _parent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.parent


def _run(cmd: list[str], env: dict[str, str], timeout_s: float, script: str,
         what: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              errors="replace", timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as e:
        tail = error_tail(_text(e.stderr), _text(e.stdout))
        raise ExportError(f"{script} timed out after {timeout_s:g} s for {what}; last output:\n{tail}") from e
    except OSError as e:
        raise ExportError(f"cannot start {script}: {e}") from e


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _check_gguf(path: Path, script: str, proc: subprocess.CompletedProcess[str]) -> None:
    if not path.is_file():
        raise ExportError(f"{script} exited 0 but wrote no file at {path}:\n{error_tail(proc.stderr, proc.stdout)}")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ExportError(f"{script} wrote {path.stat().st_size} bytes that are not GGUF (magic {magic!r})")


def _check_outtype(outtype: str) -> None:
    if outtype not in OUTTYPES:
        raise ExportError(f"outtype must be one of {', '.join(OUTTYPES)}, not {outtype!r}")


def _check_model_dir(path: Path, label: str, *, weights: bool = True) -> None:
    if not path.is_dir():
        raise ExportError(f"{label} folder {path} does not exist")
    if not (path / "config.json").is_file():
        raise ExportError(f"{label} folder {path} has no config.json (not a Hugging Face model folder)")
    if weights and not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        raise ExportError(f"{label} folder {path} has no weights (*.safetensors or pytorch_model*.bin)")


def _check_adapter_dir(path: Path) -> None:
    if not path.is_dir():
        raise ExportError(f"adapter folder {path} does not exist")
    if not (path / "adapter_config.json").is_file():
        raise ExportError(f"adapter folder {path} has no adapter_config.json (not a peft adapter)")
    if not any((path / name).is_file() for name in _ADAPTER_WEIGHTS):
        raise ExportError(f"adapter folder {path} has no {' or '.join(_ADAPTER_WEIGHTS)}")


def _merge_into(base_dir: Path, adapter_dir: Path, out_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
        merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
        merged.save_pretrained(out_dir, safe_serialization=True)
    except Exception as e:  # torch/peft raise many types; the message is what the user needs
        raise ExportError(f"merging adapter {adapter_dir} into {base_dir} failed: {type(e).__name__}: {e}") from e
    finally:
        gc.collect()


def _replace_dir(src: Path, dst: Path) -> None:
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
