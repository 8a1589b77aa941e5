"""Memory a tuning worker keeps between jobs: RSS after each of N jobs trained back to back in one process.

Run from the repository root (SmolLM2 ≈ 1 minute a job on 2 idle cores; `--model tiny` takes seconds):

    .venv/bin/python bench/bench_worker_memory.py --model smollm2 --jobs 5

Each variant is one fresh interpreter that trains `--jobs` LoRA jobs one after another, each with its own
output folder, the way a worker process serves `tuning.requested` messages:

- worker:    `handlers.tuning.runner.train_on_worker_thread`, the runner's own call (one training thread,
             memory released after every job);
- to_thread: `asyncio.to_thread(recipe.train, ...)`, what the runner did before (any thread of the loop's
             default pool, nothing released), as the baseline.

It prints the RSS (VmRSS) idle before the first job and after each job, and the ratio after the last job
to after the first (target ≤ 1.2x). The training itself is the same code in both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _jobs(mode: str, model_dir: Path, data: Path, work: Path, jobs: int) -> list[float]:
    import torch  # noqa: F401  (imported before the idle figure, as a worker has it loaded)

    from events.payloads import Hyperparameters
    from handlers.tuning import recipe, runner

    series = [rss_mb()]
    hp = Hyperparameters(epochs=1, batch_size=8, max_seq_len=512, packing=True, validation_split=0.1,
                         save_steps=10**6, eval_steps=10**6, seed=0)
    for i in range(jobs):
        args = (model_dir, data, "chat", hp, work / f"job-{i}", recipe.NullHooks(), None)
        if mode == "worker":
            await runner.train_on_worker_thread(*args)
        else:
            await asyncio.to_thread(recipe.train, *args)
        series.append(rss_mb())
        print(f"  {mode}: job {i + 1} done, RSS {series[-1]:.0f} MB", file=sys.stderr, flush=True)
    return series


def _prepare(model: str, work: Path, rows: int) -> tuple[Path, Path]:
    from devkit.tinymodel import build_tiny_llama, toy_dataset

    if model == "smollm2":
        from infra.smollm2 import checkpoint_dir

        model_dir = checkpoint_dir(ROOT / ".codetune")
    else:
        model_dir = build_tiny_llama(work / "model")
    return model_dir, toy_dataset(work / "chat.jsonl", "chat", rows=rows, seed=0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--rows", type=int, default=96, help="chat rows per job")
    parser.add_argument("--variants", default="worker,to_thread")
    parser.add_argument("--child", choices=["worker", "to_thread"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        series = asyncio.run(_jobs(args.child, args.model_dir, args.data, args.work, args.jobs))
        print("RESULT " + json.dumps(series), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="bench-worker-mem-") as tmp:
        work = Path(tmp)
        model_dir, data = _prepare(args.model, work, args.rows)
        print(f"model {args.model}, {args.jobs} jobs of {args.rows} chat rows each, one process per variant")
        for mode in args.variants.split(","):
            cmd = [sys.executable, __file__, "--child", mode, "--model-dir", str(model_dir), "--data", str(data),
                   "--work", str(work / mode), "--jobs", str(args.jobs)]
            env = os.environ | {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
            out = subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
            series = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:])
            steps = " -> ".join(f"{x:.0f}" for x in series[1:])
            print(f"{mode:<10} RSS MB idle {series[0]:.0f}, after each job: {steps}; "
                  f"last/first job {series[-1] / series[1]:.2f}x", flush=True)


if __name__ == "__main__":
    main()
