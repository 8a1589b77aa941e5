"""llama.cpp's own GGUF converters, installed from PyPI without compiling anything.

`convert_hf_to_gguf.py` and `convert_lora_to_gguf.py` (with their `conversion/` package and the matching
`gguf-py/`) ship inside the sdist of `llama-cpp-python` under `vendor/llama.cpp/`. `ensure_converters`
fetches that sdist with a plain `pip download --no-deps` (no `--no-binary`: that would make pip build the
C++ library, ~9 min) and extracts only the converter files into `<data_dir>/llama.cpp/<version>/`.

- Idempotent and atomic: files are extracted into a temporary sibling folder and renamed into place only
  when complete; a second call (or a concurrent one) finds the finished folder and returns at once.
- The sdist is cached under `<data_dir>/llama.cpp/sdist/` so a re-extraction never downloads again.
- `settings.llamacpp_dir` (`CODETUNE_LLAMACPP_DIR`) points at an existing llama.cpp checkout instead; it is
  validated, never modified.

Python dependencies of the converters (all in the `train` extra): torch, transformers, numpy, safetensors,
sentencepiece (SentencePiece vocabularies), protobuf, and — via the vendored `gguf-py` — pyyaml, tqdm and
requests. `converter_env` puts the vendored `gguf-py` first on `PYTHONPATH` (the scripts also insert it
themselves) so the `gguf` package that matches the scripts wins over the PyPI `gguf` in the venv.

CLI: `python -m handlers.export.llamacpp [--version X] [--force]` installs and prints the folder.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from core.errors import ConvertersUnavailableError, ExportError
from core.settings import Settings, get_settings

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_PROJECT = "llama-cpp-python"
VENDOR_PREFIX = "vendor/llama.cpp/"
MARKER = ".codetune-converters.json"

# What the converters need at run time, relative to the llama.cpp root.
REQUIRED = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/__init__.py",
            "gguf-py/gguf/__init__.py")
# Extracted from the sdist: the two scripts, their packages, the licence, the two builtin vocabularies that
# `conversion/base.py::_set_vocab_builtin` reads from `models/` (mamba, openelm) and `models/templates/`
# (chat templates some model classes embed).
_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "LICENSE",
          "models/ggml-vocab-llama-spm.gguf", "models/ggml-vocab-gpt-neox.gguf")
_DIRS = ("conversion/", "gguf-py/gguf/", "models/templates/")
_GGUF_PY_FILES = ("gguf-py/pyproject.toml", "gguf-py/LICENSE", "gguf-py/README.md")

PIP_TIMEOUT_S = 900


# --------------------------------------------------------------------------- public API


def ensure_converters(settings: Settings | None = None, *, version: str = LLAMA_CPP_PYTHON_VERSION,
                      force: bool = False) -> Path:
    """Return a folder holding `convert_hf_to_gguf.py`, `convert_lora_to_gguf.py`, `conversion/`, `gguf-py/`.

    Uses `settings.llamacpp_dir` when set (validated only). Otherwise installs into
    `<settings.data_dir>/llama.cpp/<version>/` once; later calls return immediately. `force` re-extracts
    (from the cached sdist). Raises `ExportError` when the folder cannot be found, downloaded or extracted.
    """
    settings = settings or get_settings()
    if settings.llamacpp_dir is not None:
        return validate_converters(Path(settings.llamacpp_dir).expanduser().resolve())
    root = settings.data_dir / "llama.cpp"
    target = root / version
    if not force and _is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{version}.lock"):
        if not force and _is_complete(target):  # another process finished while we waited
            return target
        sdist = download_sdist(root / "sdist", version)
        extract_converters(sdist, target, replace=force)
    return validate_converters(target)


def validate_converters(path: Path) -> Path:
    """Check that `path` is a usable llama.cpp converter folder; return it or raise `ExportError`."""
    if not path.is_dir():
        raise ExportError(f"llama.cpp converter folder {path} does not exist")
    missing = [rel for rel in REQUIRED if not (path / rel).is_file()]
    if missing:
        raise ExportError(f"llama.cpp converter folder {path} is incomplete: missing {', '.join(missing)}")
    return path


def converter_env(converters_dir: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for running a converter: vendored `gguf-py` first on PYTHONPATH, hub access off."""
    env = dict(os.environ if base is None else base)
    gguf_py = str(converters_dir / "gguf-py")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (gguf_py, env.get("PYTHONPATH", "")) if p)
    env.pop("NO_LOCAL_GGUF", None)  # the scripts would then skip their own gguf-py
    env.setdefault("HF_HUB_OFFLINE", "1")  # inputs are local folders: a hub lookup would be a bug
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def download_sdist(cache_dir: Path, version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """Return the cached `llama-cpp-python` sdist, fetching it with `pip download --no-deps` if absent."""
    name = f"llama_cpp_python-{version}.tar.gz"
    cached = cache_dir / name
    if cached.is_file() and _tar_ok(cached):
        return cached
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache_dir) as tmp:
        _pip_download(f"{SDIST_PROJECT}=={version}", Path(tmp))
        found = sorted(Path(tmp).glob("*.tar.gz"))
        if not found:
            got = ", ".join(p.name for p in Path(tmp).iterdir()) or "nothing"
            raise ExportError(f"pip download of {SDIST_PROJECT}=={version} gave no sdist (got {got})")
        os.replace(found[0], cached)
    return cached


def extract_converters(sdist: Path, target: Path, *, replace: bool = False) -> Path:
    """Extract the converter files of `sdist` into `target` atomically (temp folder, then rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the install is shared like any venv file
    try:
        count = _extract_members(sdist, tmp)
        validate_converters(tmp)
        (tmp / MARKER).write_text(json.dumps({
            "sdist": sdist.name, "sha256": _sha256(sdist), "files": count, "installed_at": time.time(),
        }, indent=2) + "\n")
        _swap_into_place(tmp, target, replace=replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- internals


def _is_complete(path: Path) -> bool:
    return (path / MARKER).is_file() and all((path / rel).is_file() for rel in REQUIRED)


def _wanted(rel: str) -> bool:
    if rel in _FILES or rel in _GGUF_PY_FILES:
        return True
    return any(rel.startswith(d) and "/tests/" not in rel and "__pycache__" not in rel for d in _DIRS)


def _extract_members(sdist: Path, dest: Path) -> int:
    """Copy the wanted regular files under `vendor/llama.cpp/` of the sdist to `dest`; return how many."""
    count = 0
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar:
                rel = _vendor_relpath(member.name)
                if rel is None or not member.isfile() or not _wanted(rel):
                    continue
                out = dest / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                if src is None:
                    continue
                with src, out.open("wb") as f:
                    shutil.copyfileobj(src, f)
                count += 1
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ExportError(f"cannot extract llama.cpp converters from {sdist}: {e}") from e
    return count


def _vendor_relpath(name: str) -> str | None:
    """`llama_cpp_python-X/vendor/llama.cpp/a/b.py` → `a/b.py`; None outside the vendor tree or if unsafe."""
    parts = PurePosixPath(name).parts
    if len(parts) < 2:
        return None
    rest = "/".join(parts[1:])
    if not rest.startswith(VENDOR_PREFIX):
        return None
    rel = rest[len(VENDOR_PREFIX):]
    if not rel or rel.startswith("/") or ".." in PurePosixPath(rel).parts:
        return None
    return rel


def _swap_into_place(tmp: Path, target: Path, *, replace: bool) -> None:
    if target.exists():
        if not replace and _is_complete(target):
            return  # a concurrent installer won the race; keep its (identical) result
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, target)


def _pip_download(requirement: str, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           requirement, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as e:
        raise ConvertersUnavailableError(f"`pip download {requirement}` timed out after {PIP_TIMEOUT_S} s") from e
    if proc.returncode != 0:
        hint = ""
        if "No module named pip" in proc.stderr:
            hint = " (this Python has no pip; install it or set CODETUNE_LLAMACPP_DIR to a llama.cpp checkout)"
        raise ConvertersUnavailableError(f"`pip download {requirement}` failed with exit code {proc.returncode}{hint}: "
                          f"{_tail(proc.stderr or proc.stdout)}")


def _tar_ok(path: Path) -> bool:
    try:
        with tarfile.open(path, "r:gz") as tar:
            return tar.next() is not None
    except (tarfile.TarError, OSError, EOFError):
        return False


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _tail(text: str, lines: int = 8) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX); elsewhere a no-op, the atomic rename still keeps results whole."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with path.open("a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m handlers.export.llamacpp", description=__doc__.splitlines()[0])
    parser.add_argument("--version", default=LLAMA_CPP_PYTHON_VERSION, help="llama-cpp-python sdist version")
    parser.add_argument("--force", action="store_true", help="re-extract even if already installed")
    args = parser.parse_args(argv)
    try:
        path = ensure_converters(get_settings(), version=args.version, force=args.force)
    except ExportError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
