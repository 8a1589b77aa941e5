"""GGUF header metadata for the Ollama stand-in, read with the `gguf` package's own `GGUFReader`.

`read_gguf_info(path)` gives the key/values (`general.architecture`, `tokenizer.chat_template`,
`tokenizer.ggml.tokens`, …) and the parameter count; tensor data is memory-mapped, never read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# llama.cpp's `general.file_type` values (gguf.LlamaFileType) by the names Ollama shows as quantization_level
_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
               11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
               17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}


@dataclass
class GGUFInfo:
    kv: dict[str, Any]
    n_params: int

    @property
    def file_type(self) -> str:
        ft = self.kv.get("general.file_type")
        return _FILE_TYPES.get(ft, f"unknown({ft})") if ft is not None else "unknown"

    @property
    def architecture(self) -> str:
        return str(self.kv.get("general.architecture", ""))

    @property
    def is_adapter(self) -> bool:
        return self.kv.get("general.type") == "adapter"

    def token(self, key: str) -> str | None:
        tokens, tid = self.kv.get("tokenizer.ggml.tokens"), self.kv.get(key)
        return tokens[tid] if isinstance(tokens, list) and isinstance(tid, int) and tid < len(tokens) else None


def read_gguf_info(path: Path) -> GGUFInfo:
    """Header key/values and parameter count of a GGUF file; ValueError when it is not one (or is cut short)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path, "r")
    except ValueError:
        raise
    except (IndexError, KeyError, TypeError, OverflowError) as e:  # a header cut short or corrupt
        raise ValueError(f"corrupt GGUF header ({type(e).__name__}: {e})") from e
    kv = {name: _plain(f.contents()) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    return GGUFInfo(kv, n_params)


def _plain(value: Any) -> Any:
    """numpy scalars (what GGUFReader hands back) as Python values, so they compare, hash and serialise."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value.item() if hasattr(value, "item") else value
