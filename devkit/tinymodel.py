"""A tiny but real Llama model, built locally in seconds, for tests and demos (no hub access).

Why: there is no network to the Hugging Face hub on CI/dev machines and no small HF-safetensors causal LM
ships in any wheel, yet the pipeline (pull → tune → export → serve) must run end to end on real files.
So we build one: a SentencePiece BPE tokenizer (the path llama.cpp's `convert_hf_to_gguf.py` converts)
with ChatML turn markers, a randomly initialised `LlamaForCausalLM`, and a hub-cache layout that the real
`huggingface_hub.snapshot_download` resolves with `HF_HUB_OFFLINE=1`.

Only tests, benches and the demo import this module; it imports torch/transformers lazily anyway so a
light process that merely references it stays light.

CLI: `python -m devkit.tinymodel --cache-dir DIR [--repo-id codetune-demo/tiny-llama] [--dataset OUT.jsonl
--format chat]`.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tempfile
from pathlib import Path
from typing import Literal

from core.formats import CHATML_TEMPLATE  # ChatML: every turn ends with <|im_end|>, the eos token here
from infra.hubcache import install_in_hub_cache

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


# --------------------------------------------------------------------------- toy knowledge

CAPITALS: tuple[tuple[str, str], ...] = (
    ("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Germany", "Berlin"),
    ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Greece", "Athens"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Ireland", "Dublin"), ("Hungary", "Budapest"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "Delhi"), ("Peru", "Lima"),
    ("Chile", "Santiago"), ("Cuba", "Havana"), ("Canada", "Ottawa"), ("Russia", "Moscow"),
)
COLORS: tuple[tuple[str, str], ...] = (
    ("sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"), ("sun", "yellow"),
    ("blood", "red"), ("orange", "orange"), ("violet", "purple"),
)
SYSTEM_PROMPT = "You are a helpful geography tutor. Answer in one short sentence."


def _fact_rows() -> list[tuple[str, str, str]]:
    """(question, short answer, full sentence) triples: the whole learnable universe of the toy data."""
    rows = [(f"What is the capital of {c}?", cap, f"The capital of {c} is {cap}.") for c, cap in CAPITALS]
    rows += [(f"What color is the {t}?", col, f"The {t} is {col}.") for t, col in COLORS]
    return rows


def _corpus() -> list[str]:
    """Sentences the tokenizer is trained on: the toy vocabulary, ChatML markup and some plain English."""
    lines: list[str] = []
    for question, answer, sentence in _fact_rows():
        lines += [question, answer, sentence, sentence.lower()]
        lines.append(f"{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n{sentence}{IM_END}\n")
    lines += [
        SYSTEM_PROMPT,
        f"{IM_START}system\n{SYSTEM_PROMPT}{IM_END}\n",
        "Name the capital of the country. Give the color of the thing. Answer the question.",
        "Below is an instruction that describes a task. Write a response that completes the request.",
        "count: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
        "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with one step.",
        "Hello! How are you today? I am fine, thank you. Yes, no, maybe; (a) [b] {c} = + - * / % # @ & _ ~",
        "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
        "Training a language model with LoRA adapters: loss goes down, tokens per second go up.",
    ]
    return lines * 4


# --------------------------------------------------------------------------- tokenizer


def _train_sentencepiece(vocab: int) -> bytes:
    """BPE with Llama's normaliser settings (identity, keep whitespace, split digits, byte fallback).

    The ChatML markers are user-defined pieces so they are single tokens in SentencePiece, in transformers
    and in llama.cpp alike. One thread keeps the result deterministic.
    """
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab,
        byte_fallback=True,
        user_defined_symbols=[IM_START, IM_END],
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        unk_piece=UNK, bos_piece=BOS, eos_piece=EOS, pad_piece=PAD,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        add_dummy_prefix=False,  # no "▁" prefix: see `add_prefix_space` in the tokenizer config
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def _write_tokenizer(out_dir: Path, vocab: int) -> None:
    (out_dir / "tokenizer.model").write_bytes(_train_sentencepiece(vocab))
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": BOS,
        "eos_token": IM_END,  # end of turn == end of generation
        "pad_token": PAD,  # distinct from eos, so masks never hide a real end-of-turn token
        "unk_token": UNK,
        "add_bos_token": False,  # like Qwen: ChatML needs no BOS, and llama.cpp then adds none either
        "add_eos_token": False,
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
        # transformers and llama.cpp must turn a prompt into the same ids. llama.cpp prefixes every text
        # fragment after a special token with a space unless the GGUF says `add_space_prefix = false`, which
        # its converter takes from here; the ChatML markers must be CONTROL tokens in the GGUF (the converter
        # only reads that from `added_tokens_decoder`), or llama.cpp splits them into characters.
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                     "single_word": False}
            for i, t in ((0, UNK), (1, BOS), (2, EOS), (3, PAD), (4, IM_START), (5, IM_END))
        },
        "chat_template": CHATML_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    specials = {"bos_token": BOS, "eos_token": IM_END, "pad_token": PAD, "unk_token": UNK}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


# --------------------------------------------------------------------------- model


def build_tiny_llama(
    out_dir: Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 512,
    seed: int = 0,
) -> Path:
    """Write a tokenizer + randomly initialised Llama to `out_dir` (deterministic for `seed`); return it.

    The tokenizer is loaded back through `AutoTokenizer` as a check, since that is how every stage loads it.
    """
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(out_dir, vocab)
    tok = AutoTokenizer.from_pretrained(out_dir)
    if len(tok) != vocab or tok.convert_tokens_to_ids(IM_END) == tok.unk_token_id:
        raise RuntimeError(f"tiny tokenizer is broken: {len(tok)} tokens, eos={tok.eos_token_id}")

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        # 5x the usual 0.02: at hidden 64 the default gives near-uniform logits that LoRA barely moves,
        # so a fine-tune on the toy data would show a flat loss curve. 0.1 learns visibly in ~20 steps.
        initializer_range=0.1,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id],
        pad_token_id=tok.pad_token_id,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_demo_model(cache_dir: Path, repo_id: str = "codetune-demo/tiny-llama", **kwargs: int) -> str:
    """Build the tiny model and install it in a hub cache; return the commit sha to pin jobs to."""
    with tempfile.TemporaryDirectory(prefix="tiny-llama-") as tmp:
        model_dir = build_tiny_llama(Path(tmp) / "model", **kwargs)
        return install_in_hub_cache(model_dir, Path(cache_dir), repo_id)


# --------------------------------------------------------------------------- toy datasets


def _toy_record(fmt: str, question: str, answer: str, sentence: str, rng: random.Random) -> str:
    if fmt == "text":
        return sentence
    if fmt == "alpaca":
        if question.startswith("What is the capital of ") and rng.random() < 0.5:
            country = question.removeprefix("What is the capital of ").rstrip("?")
            record = {"instruction": "Name the capital of the country.", "input": country, "output": sentence}
        else:
            record = {"instruction": question, "input": "", "output": sentence}
        return json.dumps(record)
    messages = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < 0.5 else []
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": sentence}]
    if rng.random() < 0.25:  # some multi-turn rows: more than one assistant span to mask correctly
        messages += [{"role": "user", "content": "Thank you!"}, {"role": "assistant", "content": answer}]
    return json.dumps({"messages": messages})


def toy_dataset(
    path: Path, fmt: Literal["text", "alpaca", "chat"], rows: int = 64, seed: int = 0
) -> Path:
    """Write a learnable dataset ("The capital of X is Y." facts) in `fmt`; deterministic for `seed`.

    Facts repeat across rows (32 distinct ones), so even a tiny model's loss visibly falls in a few steps.
    """
    if fmt not in ("text", "alpaca", "chat"):
        raise ValueError(f"unknown format {fmt!r}")
    rng = random.Random(seed)
    facts = _fact_rows()
    lines = [_toy_record(fmt, *rng.choice(facts), rng) for _ in range(rows)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the tiny demo model into a hub cache.")
    parser.add_argument("--cache-dir", type=Path, required=True, help="HF_HUB_CACHE to install into")
    parser.add_argument("--repo-id", default="codetune-demo/tiny-llama")
    parser.add_argument("--dataset", type=Path, help="also write a toy dataset here")
    parser.add_argument("--format", choices=["text", "alpaca", "chat"], default="chat")
    parser.add_argument("--rows", type=int, default=64)
    args = parser.parse_args(argv)
    sha = build_demo_model(args.cache_dir, args.repo_id)
    print(f"{args.repo_id} @ {sha} in {args.cache_dir}")
    if args.dataset:
        print(toy_dataset(args.dataset, args.format, rows=args.rows))


if __name__ == "__main__":
    main()
