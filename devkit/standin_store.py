"""The Ollama stand-in's storage: content-addressed blobs and model manifests under one folder
(`<dir>/blobs/sha256-<hex>`, `<dir>/manifests/<name>.json`), and the error type its endpoints answer with."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from devkit.gguf_info import GGUFInfo, read_gguf_info

_DIGEST_RE = re.compile(r"^sha256[:-]([0-9a-f]{64})$")


class OllamaError(Exception):
    """An error answered the way Ollama answers it: this HTTP status and `{"error": message}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class ModelRecord:
    name: str  # normalised: "name:tag"
    files: dict[str, str]
    adapters: dict[str, str]
    template: str
    system: str
    parameters: dict[str, Any]
    details: dict[str, Any]
    model_info: dict[str, Any]
    size: int
    created_at: str
    quantize_requested: str | None = None
    digest: str = ""

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.name, "modified_at": self.created_at, "size": self.size,
                "digest": self.digest, "details": self.details}


class Store:
    """Blobs (content-addressed) and model manifests under one folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.manifests = self.root / "manifests"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.manifests.mkdir(parents=True, exist_ok=True)
        self._infos: dict[str, GGUFInfo] = {}

    def blob_path(self, digest: str) -> Path:
        m = _DIGEST_RE.match(digest)
        if not m:
            raise OllamaError(400, f"invalid digest format {digest!r} (want sha256:<64 hex>)")
        return self.blobs / f"sha256-{m.group(1)}"

    async def write_blob(self, digest: str, chunks: AsyncIterator[bytes]) -> bool:
        """Store a blob after checking its SHA-256; False when it already existed (body discarded)."""
        path = self.blob_path(digest)
        h = hashlib.sha256()
        fd, tmp_name = tempfile.mkstemp(prefix=".upload-", dir=self.blobs)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in chunks:
                    h.update(chunk)
                    out.write(chunk)
            got = f"sha256:{h.hexdigest()}"
            if got != f"sha256:{path.name.removeprefix('sha256-')}":
                raise OllamaError(400, f"digest mismatch, expected \"{digest}\", got \"{got}\"")
            if path.exists():
                return False
            os.replace(tmp, path)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def info(self, digest: str) -> GGUFInfo:
        """GGUF metadata of a stored blob (ValueError when it is not a GGUF), read once per blob: blobs are
        content-addressed, and GGUFReader parses every tokenizer string (seconds for a 50k vocabulary)."""
        if digest not in self._infos:
            self._infos[digest] = read_gguf_info(self.blob_path(digest))
        return self._infos[digest]

    def _manifest(self, name: str) -> Path:
        return self.manifests / (urllib.parse.quote(name.lower(), safe="") + ".json")

    def get(self, name: str) -> ModelRecord | None:
        path = self._manifest(normalize_name(name))
        if not path.is_file():
            return None
        return ModelRecord(**json.loads(path.read_text()))

    def put(self, record: ModelRecord) -> None:
        body = asdict(record)
        body["digest"] = ""
        record.digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        path = self._manifest(record.name)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(record), indent=2))
        os.replace(tmp, path)

    def delete(self, name: str) -> bool:
        path = self._manifest(normalize_name(name))
        if not path.is_file():
            return False
        path.unlink()
        self._prune()
        return True

    def all(self) -> list[ModelRecord]:
        return [ModelRecord(**json.loads(p.read_text())) for p in sorted(self.manifests.glob("*.json"))]

    def _prune(self) -> None:
        used = {d for r in self.all() for d in (*r.files.values(), *r.adapters.values())}
        for blob in self.blobs.glob("sha256-*"):
            digest = "sha256:" + blob.name.removeprefix("sha256-")
            if digest not in used:
                blob.unlink(missing_ok=True)
                self._infos.pop(digest, None)


def normalize_name(name: str) -> str:
    """Ollama names: `model` means `model:latest`; matching is case-insensitive."""
    name = name.strip()
    last = name.rsplit("/", 1)[-1]
    return (name if ":" in last else f"{name}:latest").lower()

