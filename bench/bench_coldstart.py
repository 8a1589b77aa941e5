"""Cold start: from process start to the first message handled, a stage worker vs a raw nats-py consumer.

Run from the repository root (about 1-2 minutes on 2 busy CPU cores):

    .venv/bin/python bench/bench_coldstart.py             # 7 repetitions of every row
    .venv/bin/python bench/bench_coldstart.py --reps 3 --stages datasets

It starts ONE real local stack (`infra.stack.LocalStack` on free loopback ports in a temporary folder, as
bench/bench_datasets.py does), provisions the CODETUNE streams as `codetune stack start` does, and then,
for each repetition, round-robin over the rows (so a burst of load from the other tenants of the machine
hits every row alike):

1. PRE-PUBLISHES one message while no worker of that stage runs (it waits in the stage's durable);
2. starts the worker PROCESS — `python -m infra.cli worker STAGE --exit-when-idle 1`, exactly what a
   supervisor or KEDA starts — and measures from just before the spawn to the moment the stage's answer
   arrives on a core-NATS subscription of this process (then waits for the worker to exit by itself);
   - datasets: `dataset.uploaded` for a small file in the bucket → `dataset.validated` (S3 get, MongoDB
     write, publish): the stage's whole path;
   - serving: `model.exported` for a job no one recorded → its dead letter on `dlq.model.exported` (the
     MongoDB lookup, the letter): serving's light path, nothing sent to Ollama;
   - export: `tuning.completed` for a job no one recorded → `dlq.tuning.completed`: export's light path
     (no converter, no torch);
   - ollama (the always-on request-reply stage): nothing to pre-publish, a core-NATS request is not kept;
     the bench sends `ollama.models` every 50 ms from the spawn on ("no responders" until the worker
     subscribes) and takes the first reply. Ollama itself is not running, so the reply is the stage's
     `ollama_unavailable` answer: the stage's whole path (the Ollama client imported, the call refused),
     without Ollama's own time;
3. raw: a process that imports only nats-py, connects as the admin user, binds a pull consumer on a
   bench stream (`BENCH_COLD`, `bench.cold.in` → durable `bench-cold`), fetches the pre-published message,
   publishes an answer to `bench.cold.out` and acks: the floor for "a Python process that answers a
   JetStream message".

`--baseline-tree DIR` adds the same worker rows run from another checkout (e.g. the code before these
changes: `git archive REV | tar -x -C DIR`), in the same run and environment, and prints this tree's
median wall and CPU over the baseline's (its worker, which may not know `--exit-when-idle`, is stopped
with SIGTERM once it has answered).

Also printed: `python -c pass` (the interpreter alone) and `import+build STAGE` (a process that imports
`handlers.app` and runs `build_app([STAGE])` without connecting): the share of imports in the total.
Each worker prints the torch/transformers/peft modules in its `sys.modules` at exit (an atexit hook of the
bench's launcher line, not of the product): a light stage that pulls in the training stack fails the bench.

Figures move 10-30% between runs on 2 shared cores: the load average is printed before and after; compare
the rows and the ratios within one run (median and best of `--reps`), not absolute numbers across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_datasets import _child_env, local_stack  # noqa: E402

BENCH_STREAM, BENCH_IN, BENCH_OUT, BENCH_DURABLE = "BENCH_COLD", "bench.cold.in", "bench.cold.out", "bench-cold"

RAW_CONSUMER = """import asyncio, json, os, sys
import nats

async def main():
    opts = json.loads(os.environ["BENCH_NATS"])
    nc = await nats.connect(**opts)
    js = nc.jetstream()
    sub = await js.pull_subscribe_bind(durable=sys.argv[2], stream=sys.argv[1])
    msg = (await sub.fetch(1, timeout=30))[0]
    await nc.publish(sys.argv[3], msg.data)
    await msg.ack()
    await nc.drain()

asyncio.run(main())
"""

# `codetune worker ...` exactly as the console script runs it, plus one line at exit naming the training
# modules it imported (none for a light stage)
WORKER = ("import atexit, runpy, sys; atexit.register(lambda: print('codetune modules at exit:', "
          "*[m for m in ('torch', 'transformers', 'peft') if m in sys.modules], flush=True)); "
          "sys.argv = ['codetune', *sys.argv[1:]]; runpy.run_module('infra.cli', run_name='__main__', alter_sys=True)")

# CODETUNE_BUILD_APP=0: a --baseline-tree from before the app factory built its app at import time
IMPORT_BUILD = ("import os, sys; os.environ['CODETUNE_BUILD_APP'] = '0'; from handlers.app import build_app; "
                "build_app([sys.argv[1]])")

STAGES = ("datasets", "serving", "export", "ollama")
REQUEST_REPLY = {"ollama"}  # answered on core NATS: polled with requests, nothing pre-published


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


async def _setup(settings: Any) -> tuple[Any, Any]:
    from nats.js.api import ConsumerConfig, StreamConfig

    from events.client import CodeTuneClient
    from storage.objects import ObjectStore

    c = await CodeTuneClient.connect(settings, source="codetune/bench", role="admin")
    await c.js.add_stream(StreamConfig(name=BENCH_STREAM, subjects=[BENCH_IN]))
    await c.js.add_consumer(BENCH_STREAM, ConsumerConfig(durable_name=BENCH_DURABLE, ack_policy="explicit",
                                                         filter_subject=BENCH_IN))
    store = ObjectStore(settings)
    await store.ensure_bucket()
    return c, store


async def _first_reply(c: Any) -> float:
    """Ask `ollama.models` until a worker answers; the time of the first reply."""
    from nats.errors import NoRespondersError, TimeoutError

    from events import subjects as sj

    while True:
        try:
            await c.nc.request(sj.OLLAMA_MODELS, b"{}", timeout=5)
            return time.perf_counter()
        except (NoRespondersError, TimeoutError):
            await asyncio.sleep(0.05)


async def _prepublish(row: str, c: Any, store: Any) -> tuple[str, Any]:
    """Publish the row's message; return (answer subject, match(data) -> bool)."""
    from events import subjects as sj
    from events.payloads import DatasetUploaded, ModelExported, TrainMetrics, TuningCompleted

    tag = uuid.uuid4().hex[:10]
    if row == "raw":
        await c.js.publish(BENCH_IN, json.dumps({"tag": tag}).encode())
        return BENCH_OUT, lambda d: d.get("tag") == tag
    if row == "datasets":
        key = f"datasets/ds-{tag}/f.txt"
        await store.put_bytes(key, b"".join(f"line {i}: def f(x): return x * {i}\n".encode() for i in range(20)))
        await c.publish(DatasetUploaded(dataset_id=f"ds-{tag}", key=key, name="f.txt"))
        return sj.DATASET_VALIDATED, lambda d: d.get("dataset_id") == f"ds-{tag}"
    if row == "serving":
        await c.publish(ModelExported(job_id=f"job-{tag}", name=f"cold-{tag}", mode="adapter",
                                      model_key=f"exports/job-{tag}/base.gguf", modelfile_key=f"exports/job-{tag}/M",
                                      template="{{ .Prompt }}", stop=[]))
        return sj.dead_letter_subject(sj.MODEL_EXPORTED), lambda d: f"job-{tag}" in json.dumps(d)
    if row == "export":
        metrics = TrainMetrics(steps=1, epochs=1.0, train_loss=1.0, eval_loss=None, tokens=1, tokens_per_s=1.0,
                               duration_s=1.0)
        await c.publish(TuningCompleted(job_id=f"job-{tag}", base_model="org/model", sha="a" * 40,
                                        dataset_id=f"ds-{tag}", adapter_key=f"jobs/job-{tag}/adapter",
                                        metrics=metrics, loss_history=[]))
        return sj.dead_letter_subject(sj.TUNING_COMPLETED), lambda d: f"job-{tag}" in json.dumps(d)
    raise ValueError(row)


PYTHON: dict[str, str] = {}  # stage -> interpreter of its own environment (--python STAGE=PATH)
BASELINE = "baseline "  # row prefix: the stage's worker run from --baseline-tree


def _stage(row: str) -> str:
    return row.removeprefix(BASELINE)


def _command(row: str) -> list[str]:
    if row == "raw":
        return [sys.executable, "-c", RAW_CONSUMER, BENCH_STREAM, BENCH_DURABLE, BENCH_OUT]
    if row.startswith(BASELINE):  # a tree from before --exit-when-idle: stopped with SIGTERM after its answer
        return [sys.executable, "-c", WORKER, "worker", _stage(row)]
    return [PYTHON.get(row, sys.executable), "-c", WORKER, "worker", row, "--exit-when-idle", "1"]


def _reap(proc: subprocess.Popen[bytes]) -> tuple[int, float]:
    """Wait for the child; its exit code and its own CPU seconds (user + sys)."""
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, ru.ru_utime + ru.ru_stime


async def _one(row: str, c: Any, store: Any, cenv: dict[str, str], log: Path, baseline: Path | None
               ) -> tuple[float, float]:
    if _stage(row) in REQUEST_REPLY:
        return await _one_request(row, c, cenv, log)
    answer_subject, match = await _prepublish(_stage(row), c, store)
    cwd = ROOT
    if row.startswith(BASELINE) and baseline is not None:
        cwd = baseline
        cenv = cenv | {"PYTHONPATH": str(baseline) + os.pathsep + cenv.get("PYTHONPATH", "")}
    got: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    async def cb(msg: Any) -> None:
        try:
            data = json.loads(msg.data)
        except ValueError:
            return
        if isinstance(data, dict) and "data" in data and isinstance(data["data"], dict):
            data = {**data, **data["data"]}  # a structured CloudEvent
        if not got.done() and match(data):
            got.set_result(time.perf_counter())

    sub = await c.nc.subscribe(answer_subject, cb=cb)
    await c.nc.flush()
    with open(log, "ab") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(_command(row), env=cenv, cwd=cwd, stdout=out,  # noqa: ASYNC220 (reaped in a thread)
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            t1 = await asyncio.wait_for(got, 60)
        finally:
            await sub.unsubscribe()
        if row.startswith(BASELINE):
            proc.terminate()
        rc, cpu = await asyncio.wait_for(asyncio.to_thread(_reap, proc), 60)
    if rc != 0 and not (row.startswith(BASELINE) and rc in (-15, 143)):
        raise RuntimeError(f"{row} exited {rc}: {log.read_text()[-2000:]}")
    return t1 - t0, cpu


async def _one_request(row: str, c: Any, cenv: dict[str, str], log: Path) -> tuple[float, float]:
    with open(log, "ab") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(_command(row), env=cenv, cwd=ROOT, stdout=out,  # noqa: ASYNC220 (reaped in a thread)
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        t1 = await asyncio.wait_for(_first_reply(c), 60)
        rc, cpu = await asyncio.wait_for(asyncio.to_thread(_reap, proc), 60)
    if rc != 0:
        raise RuntimeError(f"{row} exited {rc}: {log.read_text()[-2000:]}")
    return t1 - t0, cpu


def _timed(cmd: list[str], cenv: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=cenv, cwd=ROOT, check=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _heavy_modules(log: Path) -> list[str]:
    bad: set[str] = set()
    for line in log.read_text(errors="replace").splitlines():
        if "codetune modules at exit:" in line:
            bad |= {m for m in ("torch", "transformers", "peft") if m in line.split(":", 1)[1].split()}
    return sorted(bad)


async def bench(env: dict[str, str], settings: Any, stages: list[str], reps: int, tmp: Path,
                baseline: Path | None = None) -> int:
    from events.client import connect_options

    c, store = await _setup(settings)
    cenv = _child_env(env) | {"BENCH_NATS": json.dumps(connect_options(settings, "admin"))}
    compared = [s for s in stages if s not in REQUEST_REPLY]  # a baseline tree may predate the ollama stage
    rows = ["raw", *stages, *([BASELINE + s for s in compared] if baseline else [])]
    times: dict[str, list[float]] = {r: [] for r in rows}
    cpus: dict[str, list[float]] = {r: [] for r in rows}
    extra: dict[str, list[float]] = {"python -c pass": []} | {f"import+build {s}": [] for s in stages}
    logs = {r: tmp / f"{r.replace(' ', '-')}.log" for r in rows}
    print(f"load average before: {loadavg()}", flush=True)
    for i in range(reps):
        for r in rows:
            wall, cpu = await _one(r, c, store, cenv, logs[r], baseline)
            times[r].append(wall)
            cpus[r].append(cpu)
        extra["python -c pass"].append(await asyncio.to_thread(_timed, [sys.executable, "-c", "pass"], cenv))
        for s in stages:
            extra[f"import+build {s}"].append(
                await asyncio.to_thread(_timed, [PYTHON.get(s, sys.executable), "-c", IMPORT_BUILD, s], cenv))
        print(f"  rep {i + 1}/{reps}: " + "  ".join(f"{r} {times[r][-1]:.3f}s" for r in rows), flush=True)
    await c.close()
    print(f"load average after:  {loadavg()}")
    raw_med = statistics.median(times["raw"])
    raw_cpu = statistics.median(cpus["raw"])
    print(f"\nto the first answer, from the spawn ({reps} runs each)")
    print(f"{'row':<28}{'median s':>10}{'best s':>10}{'x raw':>8}{'CPU s':>8}{'x raw':>8}")
    for r in rows:
        label = "raw nats-py consumer" if r == "raw" else f"worker {r}" + (" (own env)" if r in PYTHON else "")
        if r.startswith(BASELINE):
            label = f"baseline worker {_stage(r)}"
        med, cpu = statistics.median(times[r]), statistics.median(cpus[r])
        print(f"{label:<28}{med:>10.3f}{min(times[r]):>10.3f}{med / raw_med:>8.2f}{cpu:>8.3f}{cpu / raw_cpu:>8.2f}")
    for label, xs in extra.items():
        med = statistics.median(xs)
        print(f"{label:<28}{med:>10.3f}{min(xs):>10.3f}{med / raw_med:>8.2f}")
    print("(CPU s: the process's own user+sys CPU over its whole life, the idle second before a worker exits "
          "and its shutdown included; less sensitive than wall time to how busy the cores are, not immune)")
    if baseline:
        for s in compared:
            new, old = statistics.median(times[s]), statistics.median(times[BASELINE + s])
            newc, oldc = statistics.median(cpus[s]), statistics.median(cpus[BASELINE + s])
            print(f"{s}: this tree vs baseline: wall x{new / old:.2f}, CPU x{newc / oldc:.2f}")
    failed = 0
    for s in stages:
        heavy = _heavy_modules(logs[s])
        if heavy:
            print(f"FAIL: the {s} worker imported {', '.join(heavy)}")
            failed += 1
        if statistics.median(times[s]) >= 1.0:
            print(f"NOTE: worker {s} took {statistics.median(times[s]):.2f}s (median) to its first answer (goal < 1 s)")
    return 1 if failed else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated: " + ",".join(STAGES))
    ap.add_argument("--python", action="append", default=[], metavar="STAGE=PATH",
                    help="run STAGE's worker with the interpreter of an environment holding only its extra, e.g. "
                         "datasets=VENV/bin/python after `pip install -c infra/constraints.txt '.[datasets]'`")
    ap.add_argument("--baseline-tree", type=Path, help="also run each stage's worker from this checkout (e.g. "
                    "`git archive REV | tar -x -C DIR`), in the same environment; rows 'baseline worker STAGE'")
    args = ap.parse_args()
    for item in args.python:
        stage, _, path = item.partition("=")
        PYTHON[stage] = path
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        ap.error(f"unknown stage(s) {sorted(unknown)}")
    with tempfile.TemporaryDirectory(prefix="codetune-cold-") as d, local_stack(Path(d)) as (env, settings):
        baseline = args.baseline_tree.resolve() if args.baseline_tree else None
        rc = asyncio.run(bench(env, settings, stages, args.reps, Path(d), baseline))
    raise SystemExit(rc)


if __name__ == "__main__":
    main()
