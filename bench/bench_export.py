"""Overhead of CodeTune's export functions vs running llama.cpp's converters by hand.

Run (≈1 minute on 2 idle CPU cores):

    .venv/bin/python bench/bench_export.py            # --hidden 256 --layers 4 --repeats 5

Both sides convert the same checkpoint — a `build_tiny_llama` Llama (random weights) and a LoRA adapter
(r=8 on q/k/v/o) — with the same converter scripts, the same Python and the same arguments, f16:

- ours:    `handlers.export.gguf.convert_base` + `convert_adapter` (input checks, converters folder,
           environment, temp file + GGUF magic check + atomic rename, error capture);
- by hand: `subprocess.run([python, convert_hf_to_gguf.py, MODEL, --outfile, OUT, --outtype, f16])` and
           `convert_lora_to_gguf.py ADAPTER --base MODEL …`, PYTHONPATH=gguf-py, output to the final name.

Runs alternate (ours, by hand, ours, …) so machine load drifts hit both; the medians and their ratio
(target ≈ 1.0: the wrapper adds nothing measurable to a ~3 s converter run) are printed, for wall time and
for CPU time (user + sys of this process and its children: robust when other processes load the machine).
Converter install time (`ensure_converters`, cached after the first run) is reported separately.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.settings import Settings  # noqa: E402
from handlers.export.gguf import (  # noqa: E402
    BASE_SCRIPT,
    LORA_SCRIPT,
    adapter_args,
    base_args,
    convert_adapter,
    convert_base,
)
from handlers.export.llamacpp import ensure_converters  # noqa: E402


def build_checkpoint(root: Path, hidden: int, layers: int) -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from devkit.tinymodel import build_tiny_llama

    base = build_tiny_llama(root / "base", hidden=hidden, layers=layers, intermediate=hidden * 2)
    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM",
                                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(root / "adapter")
    return base, root / "adapter"


def _cpu_s() -> float:
    """CPU seconds (user + sys) of this process and its finished children so far."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def measured(fn: Callable[[], None]) -> tuple[float, float]:
    """(wall s, CPU s) of `fn`; CPU time is what load from other processes does not inflate."""
    wall, cpu = time.perf_counter(), _cpu_s()
    fn()
    return time.perf_counter() - wall, _cpu_s() - cpu


def ours(conv: Path, base: Path, adapter: Path, out: Path) -> None:
    convert_base(base, out / "ours-base.gguf", "f16", converters_dir=conv)
    convert_adapter(adapter, base, out / "ours-lora.gguf", "f16", converters_dir=conv)


def by_hand(conv: Path, base: Path, adapter: Path, out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(conv / "gguf-py")}
    for script, args in ((BASE_SCRIPT, base_args(base, out / "hand-base.gguf", "f16")),
                         (LORA_SCRIPT, adapter_args(adapter, base, out / "hand-lora.gguf", "f16"))):
        subprocess.run([sys.executable, str(conv / script), *args], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--home", type=Path, default=ROOT / ".codetune", help="data dir for the converters")
    args = parser.parse_args()

    load = os.getloadavg()
    started = time.perf_counter()
    conv = ensure_converters(Settings(_env_file=None, home=args.home))
    install_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        root = Path(tmp)
        base, adapter = build_checkpoint(root, args.hidden, args.layers)
        out = root / "out"
        out.mkdir()
        runs: dict[str, Callable[[], None]] = {"ours": lambda: ours(conv, base, adapter, out),
                                                 "by hand": lambda: by_hand(conv, base, adapter, out)}
        wall: dict[str, list[float]] = {k: [] for k in runs}
        cpu: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                w, c = measured(fn)
                wall[name].append(w)
                cpu[name].append(c)
        sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
        same = (sizes["ours-base.gguf"] == sizes["hand-base.gguf"]
                and (out / "ours-base.gguf").read_bytes() == (out / "hand-base.gguf").read_bytes())

    print(f"converters: {conv} (ensure_converters {install_s:.2f} s)")
    print(f"checkpoint: Llama hidden {args.hidden}, {args.layers} layers; base GGUF "
          f"{sizes['ours-base.gguf'] / 1e6:.1f} MB, LoRA GGUF {sizes['ours-lora.gguf'] / 1e3:.0f} kB; "
          f"identical base output: {same}")
    print(f"load average at start/end: {load[0]:.2f} / {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    print(f"{'':10}{'wall median':>12}{'wall min':>10}{'CPU median':>12}  wall runs")
    for name in wall:
        print(f"{name:10}{statistics.median(wall[name]):12.2f}{min(wall[name]):10.2f}"
              f"{statistics.median(cpu[name]):12.2f}  " + " ".join(f"{t:.2f}" for t in wall[name]))
    for label, data in (("wall", wall), ("CPU", cpu)):
        ratio = statistics.median(data["ours"]) / statistics.median(data["by hand"])
        print(f"ratio ours / by hand ({label} median): {ratio:.3f}")


if __name__ == "__main__":
    main()
