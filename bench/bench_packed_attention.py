"""One training pass of a packed row: attention example by example (`handlers.tuning.packed`) vs one masked block.

Run from the repository root (≈1 minute on 2 idle cores with SmolLM2):

    .venv/bin/python bench/bench_packed_attention.py --model smollm2   # --rows 1 --repeat 3

Both sides are the recipe's own pass (`handlers.tuning.loss.token_loss_sum` + backward, LoRA as in the
recipe) on the same packed rows of ~50-token chat examples (`data.pack`, 512 tokens a row):

- masked:   what the recipe did before: transformers' SDPA with the block-diagonal `seq x seq` mask it
            builds from the position ids (every query against every key of the row);
- segments: the recipe now: causal SDPA per group of similar-length examples, scattered back.

A third row, `padded`, is a `Trainer`-style pass for scale: the same examples as padded batches of 8
through the full model (all-position logits + cross-entropy). Figures are real tokens per second of wall
time and per CPU-second of this process (less sensitive to other work on the machine), best of
`--repeat` interleaved runs, with the load average printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SEQ = 512


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    parser.add_argument("--rows", type=int, default=1, help="packed rows per timed run")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    from devkit.tinymodel import build_tiny_llama, toy_dataset
    from events.payloads import Hyperparameters
    from handlers.tuning import data as D
    from handlers.tuning.loss import token_loss_sum
    from handlers.tuning.packed import ATTENTION
    from handlers.tuning.recipe import _load_model, _setup_threads

    _setup_threads()
    with tempfile.TemporaryDirectory(prefix="bench-attn-") as tmp:
        if args.model == "smollm2":
            from infra.smollm2 import checkpoint_dir

            base = checkpoint_dir(ROOT / ".codetune")
        else:
            base = build_tiny_llama(Path(tmp) / "model")
        tok = AutoTokenizer.from_pretrained(base)
        data = toy_dataset(Path(tmp) / "chat.jsonl", "chat", rows=96, seed=0)
        examples = D.tokenize_rows(tok, D.read_rows(data, "chat"), SEQ)
        rows = D.pack(examples, SEQ)[: args.rows]
        n_real = D.real_tokens(rows)
        padded = [examples[i : i + 8] for i in range(0, len(examples), 8)]
        padded = padded[: max(1, round(n_real / (D.real_tokens(padded[0]))))]
        model = _load_model(Path(base), Hyperparameters(seed=0), torch.device("cpu"), torch.float32)
        model.train()
        lm = model.get_base_model()
        pad = tok.eos_token_id

        def ours(kind: str) -> int:
            lm.set_attn_implementation("sdpa" if kind == "masked" else ATTENTION)
            for row in rows:
                batch = D.to_tensors([row], pad)
                labels = batch.pop("labels")
                token_loss_sum(model, batch, labels).backward()
            return n_real

        def reference(_: str) -> int:
            n = 0
            for items in padded:
                batch = D.to_tensors(items, pad)
                labels = batch.pop("labels")
                logits = model(**batch, use_cache=False).logits
                F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                ignore_index=D.IGNORE_INDEX, reduction="sum").backward()
                n += D.real_tokens(items)
            return n

        sides: dict[str, Any] = {"masked": ours, "segments": ours, "padded": reference}
        results: dict[str, list[tuple[float, float]]] = {k: [] for k in sides}
        print(f"model {Path(base).name}; {len(rows)} packed row(s), {n_real} real tokens "
              f"(examples {min(map(len, examples))}-{max(map(len, examples))} tokens); "
              f"padded: {len(padded)} batch(es) of 8", flush=True)
        for i in range(args.repeat):
            for kind in sides if i % 2 == 0 else reversed(list(sides)):
                t0, c0 = time.perf_counter(), time.process_time()
                n = sides[kind](kind)
                model.zero_grad(set_to_none=True)
                results[kind].append((n / (time.perf_counter() - t0), n / (time.process_time() - c0)))
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    best = {k: (max(a for a, _ in v), max(b for _, b in v)) for k, v in results.items()}
    for kind, (tok_s, tok_cpu) in best.items():
        print(f"{kind:<10} {tok_s:8.0f} tok/s {tok_cpu:8.0f} tok/CPU-s")
    for kind in ("masked", "padded"):
        print(f"ratio segments/{kind}: tok/s {best['segments'][0] / best[kind][0]:.2f}x, "
              f"tokens per CPU-second {best['segments'][1] / best[kind][1]:.2f}x")


if __name__ == "__main__":
    main()
