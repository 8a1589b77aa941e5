"""Throughput of our tuning recipe (packed) vs a plain transformers `Trainer` + peft script (padded).

Run (≈2 minutes on 2 idle CPU cores):

    .venv/bin/python bench/bench_tuning.py      # --rows 1024 --repeat 2 --hidden 256 --layers 4

Both runs see the same base model (a `build_tiny_llama` Llama, hidden 256, 4 layers, random weights),
the same chat data tokenized by the same code (`handlers.tuning.data`, assistant-only labels), the same
LoRA (r=8 on q/k/v/o), AdamW, lr, cosine schedule, batch size 8, max_seq_len 512, one epoch, no eval and
no checkpoints. Only the batching and the loop differ:

- ours:       `handlers.tuning.recipe.train` with `packing=True` (whole examples packed into ≤512-token
              sequences, per-example attention through position ids), 8 packed sequences per step;
- ours-accum: the same optimizer batch as 2 sequences x 4 accumulation steps: a quarter of the
              activation memory (a packed micro-batch is always batch x 512 tokens, while a padded one
              is only batch x its longest example), and shorter matmuls that suit 2 CPU cores;
- ours-2ranks: `ours` as a job with `devices: 2` (`handlers.tuning.distributed`: 2 torch.distributed
              ranks, gloo on CPU / NCCL on CUDA, each with half the threads; the same global batch);
              wall and CPU include starting the ranks, CPU sums the worker and its ranks;
- ours-2ranks-fsdp: `ours-2ranks` with `parallel: fsdp` (the base sharded across the 2 ranks, FSDP2);
- reference:  `Trainer` with `DataCollatorForSeq2Seq` padding each batch of 8 to its longest example.

Each run is its own subprocess so that peak RSS is measured per run (`os.wait4` rusage of that child).
Tokens are real (non-padding) tokens. "loop tok/s" is tokens over the training loop only (ours: time in
optimizer steps; Trainer: its `train_runtime`); "wall s" is the child's time from start to adapter saved
(load + tokenize + train + save), imports excluded, and "CPU s" the process CPU time over the same span:
it is less sensitive than wall time to other work on the machine. Each variant runs `--repeat` times,
interleaved, and the table keeps its best run (the one least disturbed); the load average is printed so a
busy machine is visible.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BATCH, SEQ, LR, SEED = 8, 512, 2e-4, 0
LABELS = {
    "ours": "ours (packed, batch 8)",
    "ours-accum": "ours (packed, batch 2 x accum 4)",
    "ours-2ranks": "ours, devices 2 (2 ranks x 4)",
    "ours-2ranks-fsdp": "ours, devices 2, fsdp",
    "reference": "Trainer+peft (padded, batch 8)",
    "trl": "TRL SFTTrainer+peft (packed, b 8)",
}
REFERENCES = ("reference", "trl")
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def _ours(model_dir: Path, data: Path, out: Path, micro: int = BATCH, devices: int = 1,
         parallel: str = "ddp") -> dict[str, Any]:
    """Our recipe; `micro` < BATCH keeps the optimizer batch (8 sequences) with gradient accumulation;
    `devices` > 1 runs it in that many ranks."""
    import resource

    from events.payloads import Hyperparameters
    from handlers.tuning import distributed
    from handlers.tuning.recipe import NullHooks, train

    def cpu() -> float:
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # the ranks, once reaped
        return time.process_time() + kids.ru_utime + kids.ru_stime

    t0, c0 = time.perf_counter(), cpu()
    hp = Hyperparameters(epochs=1, batch_size=micro, gradient_accumulation_steps=BATCH // micro,
                         max_seq_len=SEQ, learning_rate=LR, packing=True,
                         validation_split=0, save_steps=10**6, eval_steps=10**6, seed=SEED,
                         warmup_ratio=0.03, lr_scheduler="cosine", devices=devices, parallel=parallel)
    if devices > 1:
        result = distributed.train(devices, model_dir, data, "chat", hp, out, NullHooks())
    else:
        result = train(model_dir, data, "chat", hp, out, NullHooks())
    m = result.metrics
    return {"tokens": m.tokens, "steps": m.steps, "loop_tok_s": m.tokens_per_s,
            "wall_s": time.perf_counter() - t0, "cpu_s": cpu() - c0, "final_loss": m.train_loss}


def _reference(model_dir: Path, data: Path, out: Path) -> dict[str, Any]:
    """The usual HF recipe: per-example padding collator, Trainer loop, peft LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    from handlers.tuning import data as D
    from handlers.tuning.recipe import cpu_budget

    cuda = torch.cuda.is_available()
    torch.set_num_threads(min(torch.get_num_threads(), cpu_budget()))
    t0, c0 = time.perf_counter(), time.process_time()
    tok = AutoTokenizer.from_pretrained(model_dir)
    examples = D.tokenize_rows(tok, D.read_rows(data, "chat"), SEQ)
    rows = [{"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e)} for e in examples]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=BATCH, num_train_epochs=1, learning_rate=LR,
        lr_scheduler_type="cosine", warmup_steps=0.03, max_grad_norm=1.0, seed=SEED, save_strategy="no",
        logging_steps=10, report_to=[], use_cpu=not cuda, bf16=cuda, remove_unused_columns=False, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    collator = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=D.IGNORE_INDEX)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)
    metrics = trainer.train().metrics
    model.save_pretrained(out / "adapter")
    tokens = sum(len(r["input_ids"]) for r in rows)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens": tokens, "steps": trainer.state.global_step,
            "loop_tok_s": tokens / metrics["train_runtime"], "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - c0,
            "final_loss": losses[-1] if losses else None}


def _trl(model_dir: Path, data: Path, out: Path) -> dict[str, Any]:
    """TRL's SFTTrainer as a user would pick it: packing (best-fit decreasing, padding-free) + peft LoRA.

    Fed the same tokenized examples (input_ids + assistant-only labels). TRL's CPU defaults are changed
    only where they would change the comparison: fp32 (its default bf16 autocast), no gradient
    checkpointing (its default trades ~30% speed for memory; neither side recomputes here).
    """
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from handlers.tuning import data as D
    from handlers.tuning.recipe import cpu_budget

    cuda = torch.cuda.is_available()
    torch.set_num_threads(min(torch.get_num_threads(), cpu_budget()))
    t0, c0 = time.perf_counter(), time.process_time()
    tok = AutoTokenizer.from_pretrained(model_dir)
    examples = D.tokenize_rows(tok, D.read_rows(data, "chat"), SEQ)
    rows = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation="sdpa")
    args = SFTConfig(
        output_dir=str(out), per_device_train_batch_size=BATCH, num_train_epochs=1, learning_rate=LR,
        lr_scheduler_type="cosine", warmup_steps=0.03, max_grad_norm=1.0, seed=SEED, save_strategy="no",
        logging_steps=10, report_to=[], use_cpu=not cuda, disable_tqdm=True, dataloader_num_workers=0,
        packing=True, max_length=SEQ, bf16=cuda, gradient_checkpointing=False,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tok,
                         peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA))
    metrics = trainer.train().metrics
    trainer.model.save_pretrained(out / "adapter")
    tokens = sum(len(e) for e in examples)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens": tokens, "steps": trainer.state.global_step,
            "loop_tok_s": tokens / metrics["train_runtime"], "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - c0, "final_loss": losses[-1] if losses else None}


def _flops_per_token(model_dir: Path) -> float:
    """Training FLOPs per token by the usual MFU convention (PaLM): 6 x parameters + attention 12·L·H·S.

    LoRA with a frozen base needs no weight gradients (~4 x parameters), so this over-counts work done: an MFU
    from it is the model-FLOPs utilisation people compare, not the hardware's.
    """
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    head = c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads * head
    layer = c.hidden_size * (c.hidden_size * 2 + kv * 2) + 3 * c.hidden_size * c.intermediate_size
    params = c.num_hidden_layers * layer + c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return 6 * params + 12 * c.num_hidden_layers * c.hidden_size * SEQ


PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}  # bf16 dense


def _gpu_stats(model_dir: Path, result: dict[str, Any]) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {}
    name = torch.cuda.get_device_name()
    peak = float(os.environ.get("GPU_PEAK_TFLOPS", 0)) or next(
        (v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)
    achieved = result["loop_tok_s"] * _flops_per_token(model_dir) / 1e12
    return {"gpu": name, "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20, "tflops": achieved,
            "mfu": achieved / peak if peak else None}


def _child(kind: str, model_dir: Path, data: Path, out: Path) -> None:
    if kind == "reference":
        result = _reference(model_dir, data, out)
    elif kind == "trl":
        result = _trl(model_dir, data, out)
    else:
        result = _ours(model_dir, data, out, micro=2 if kind == "ours-accum" else BATCH,
                       devices=2 if kind.startswith("ours-2ranks") else 1,
                       parallel="fsdp" if kind == "ours-2ranks-fsdp" else "ddp")
    result |= _gpu_stats(model_dir, result)
    print("RESULT " + json.dumps(result), flush=True)


def _run_child(kind: str, model_dir: Path, data: Path, out: Path) -> dict[str, Any]:
    """Run one side in a fresh interpreter; its own peak RSS comes from `wait4` on that pid."""
    cmd = [sys.executable, __file__, "--child", kind, "--model-dir", str(model_dir), "--data", str(data),
           "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    assert proc.stdout is not None
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    line = next((x for x in stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"{kind} run failed (exit {proc.returncode}):\n{stdout[-2000:]}")
    return json.loads(line[len("RESULT "):]) | {"rss_mb": usage.ru_maxrss / 1024}


def _prepare(work: Path, model: str, model_path: Path | None, rows: int, hidden: int, layers: int
             ) -> tuple[Path, Path, dict[str, Any]]:
    from transformers import AutoConfig, AutoTokenizer

    from devkit.tinymodel import build_tiny_llama, toy_dataset
    from handlers.tuning import data as D

    if model_path is not None:
        model_dir = model_path
    elif model == "smollm2":
        from infra.smollm2 import checkpoint_dir

        model_dir = checkpoint_dir(ROOT / ".codetune")  # converted once, cached under .codetune/models
    else:
        model_dir = build_tiny_llama(work / "model", hidden=hidden, layers=layers, heads=4, kv_heads=2,
                                     intermediate=hidden * 11 // 4)
    cfg = AutoConfig.from_pretrained(model_dir)
    data = toy_dataset(work / "chat.jsonl", "chat", rows=rows, seed=SEED)
    tok = AutoTokenizer.from_pretrained(model_dir)
    examples = D.tokenize_rows(tok, D.read_rows(data, "chat"), SEQ)
    lengths = sorted(len(e) for e in examples)
    padded = sum(max(len(examples[i]) for i in b) * len(b) for b in D.batch_order(len(examples), BATCH, 1))
    stats = {"model": f"{model_dir.name}: Llama hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
                      f"vocabulary {cfg.vocab_size}", "rows": rows,
             "tokens": sum(lengths), "min": lengths[0], "median": lengths[len(lengths) // 2],
             "max": lengths[-1], "pad_fraction": 1 - sum(lengths) / padded}
    return model_dir, data, stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny",
                        help="tiny: random Llama (vocabulary 512); smollm2: SmolLM2-135M-Instruct (49,152)")
    parser.add_argument("--rows", type=int, help="chat rows (default 1024 tiny, 256 smollm2)")
    parser.add_argument("--repeat", type=int, help="runs per variant, interleaved; best is kept (2 tiny, 1 smollm2)")
    parser.add_argument("--variants", default=",".join(LABELS), help=f"comma-separated subset of {','.join(LABELS)}")
    parser.add_argument("--model-path", type=Path, help="a transformers checkpoint folder to use instead")
    parser.add_argument("--hidden", type=int, default=256, help="tiny model only")
    parser.add_argument("--layers", type=int, default=4, help="tiny model only")
    parser.add_argument("--child", choices=list(LABELS), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, args.model_dir, args.data, args.out)
        return
    variants = [v for v in args.variants.split(",") if v]
    if unknown := set(variants) - set(LABELS):
        parser.error(f"unknown variants: {sorted(unknown)}")
    rows = args.rows or (256 if args.model == "smollm2" else 1024)
    repeat = args.repeat or (1 if args.model == "smollm2" else 2)

    with tempfile.TemporaryDirectory(prefix="bench-tuning-") as tmp:
        work = Path(tmp)
        model_dir, data, stats = _prepare(work, args.model, args.model_path, rows, args.hidden, args.layers)
        print(f"model: {stats['model']}; data: {stats['rows']} chat rows, "
              f"{stats['tokens']} tokens, length min/median/max {stats['min']}/{stats['median']}/"
              f"{stats['max']}; random batches of {BATCH} would be {stats['pad_fraction']:.0%} padding")
        print(f"seq {SEQ}, optimizer batch {BATCH}, one epoch", flush=True)
        runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in variants}
        for i in range(repeat):  # interleaved, so a burst of other load hits every variant alike
            for kind in variants if i % 2 == 0 else reversed(variants):
                runs[kind].append(_run_child(kind, model_dir, data, work / f"{kind}-{i}"))
        results = {kind: max(rs, key=lambda r: r["loop_tok_s"]) for kind, rs in runs.items()}

    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"\n{'run':<34}{'tokens':>8}{'steps':>7}{'loop tok/s':>12}{'wall s':>8}{'CPU s':>7}{'tok/CPU-s':>10}"
          f"{'peak RSS MB':>13}{'last loss':>10}")
    for kind, r in results.items():
        print(f"{LABELS[kind]:<34}{r['tokens']:>8}{r['steps']:>7}{r['loop_tok_s']:>12.0f}{r['wall_s']:>8.1f}"
              f"{r['cpu_s']:>7.1f}{r['tokens'] / r['cpu_s']:>10.0f}{r['rss_mb']:>13.0f}"
              f"{r['final_loss'] if r['final_loss'] is not None else float('nan'):>10.3f}")
    if any("gpu" in r for r in results.values()):
        print(f"\n{'run (GPU)':<34}{'tok/s':>10}{'peak GPU MB':>13}{'TFLOP/s':>9}{'MFU':>7}   on "
              f"{next(r['gpu'] for r in results.values() if 'gpu' in r)}")
        for kind, r in results.items():
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
            print(f"{LABELS[kind]:<34}{r['loop_tok_s']:>10.0f}{r['gpu_peak_mb']:>13.0f}{r['tflops']:>9.1f}{mfu:>7}")
    for ref_kind in (k for k in REFERENCES if k in results):
        ref = results[ref_kind]
        for kind in (k for k in ("ours", "ours-accum", "ours-2ranks", "ours-2ranks-fsdp") if k in results):
            r = results[kind]
            cpu_ratio = (r["tokens"] / r["cpu_s"]) / (ref["tokens"] / ref["cpu_s"])
            print(f"ratio {kind}/{ref_kind}: loop tok/s {r['loop_tok_s'] / ref['loop_tok_s']:.2f}x, "
                  f"tokens per CPU-second {cpu_ratio:.2f}x, peak RSS {r['rss_mb'] / ref['rss_mb']:.2f}x"
                  + (f", peak GPU memory {r['gpu_peak_mb'] / ref['gpu_peak_mb']:.2f}x" if "gpu_peak_mb" in r else ""))
    if "ours" in results and "ours-2ranks" in results:
        one, two = results["ours"], results["ours-2ranks"]
        print(f"ratio ours-2ranks/ours: loop tok/s {two['loop_tok_s'] / one['loop_tok_s']:.2f}x, "
              f"wall {two['wall_s'] / one['wall_s']:.2f}x, CPU {two['cpu_s'] / one['cpu_s']:.2f}x, "
              f"last loss {two['final_loss']:.4f} vs {one['final_loss']:.4f}")


if __name__ == "__main__":
    main()
