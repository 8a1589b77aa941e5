"""A model folder laid out as a Hugging Face hub cache snapshot, so that the real
`huggingface_hub.snapshot_download` resolves it offline (`HF_HUB_OFFLINE=1`, `HF_HUB_CACHE` pointing at it).

Used for the models CodeTune builds or converts locally: SmolLM2 (`infra.smollm2`) and the dev kit's tiny
model (`devkit.tinymodel`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def install_in_hub_cache(model_dir: Path, cache_dir: Path, repo_id: str) -> str:
    """Lay `model_dir` out as a hub cache snapshot of `repo_id` in `cache_dir`; return the commit sha.

    Layout (the one `huggingface_hub` writes): `models--ORG--NAME/blobs/<sha256>`, `refs/main` holding the
    commit, `snapshots/<commit>/<file>` → relative symlink to the blob. The commit is a sha1 over the sorted
    (path, sha256) list, so the same files always give the same "revision". Idempotent.
    """
    model_dir, cache_dir = Path(model_dir), Path(cache_dir)
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no files in {model_dir}")
    hashes = {p.relative_to(model_dir).as_posix(): _sha256(p) for p in files}
    commit = hashlib.sha1("".join(f"{k} {v}\n" for k, v in sorted(hashes.items())).encode()).hexdigest()

    blobs, snapshot = repo / "blobs", repo / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    for rel, digest in hashes.items():
        blob = blobs / digest
        if not blob.exists():
            tmp = blob.with_suffix(".incomplete")
            shutil.copyfile(model_dir / rel, tmp)
            tmp.replace(blob)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return commit
