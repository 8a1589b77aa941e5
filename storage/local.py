"""This host's copies of what is in the bucket: where a base model is mirrored, what makes up a tokenizer.

Shared by the tuning and export stages (both mirror base models and copy tokenizers), so it lives below
both instead of inside either. No broker, no torch.
"""

from __future__ import annotations

from pathlib import Path

from storage.documents import BaseLLM

# The files that make up a tokenizer. One list for both places that copy them, because both copy for the
# same reader: the training recipe copies those the base model has into the adapter folder (whose tokenizer
# the export stage renders the chat template from and `convert_lora_to_gguf.py` reads), and the export
# stage copies them into a merged model folder for `convert_hf_to_gguf.py`. Either way the converter must
# see exactly what the base model had (`tokenizer.model` → the SentencePiece path), and a file the base
# model lacks is skipped, so a name that only some tokenizers have costs nothing.
TOKENIZER_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
)


def local_model_dir(scratch_dir: Path, model: BaseLLM) -> Path:
    """Where a base model snapshot is mirrored on this host (one copy per commit sha) under `scratch_dir`."""
    return Path(scratch_dir) / "models" / (model.prefix or "").replace("/", "__")
