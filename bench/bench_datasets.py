"""The datasets path's two costs: one FastStream hop vs raw nats-py, and `codetune dataset upload` vs minio.

Run from the repository root (≈2 minutes on 2 busy CPU cores; `--quick` ≈40 s):

    .venv/bin/python bench/bench_datasets.py          # = --events 5000 --paced 500 --rate 100 --size-mb 500
    .venv/bin/python bench/bench_datasets.py --quick  # = --events 1000 --paced 200 --size-mb 250
    (--only hop|upload runs one part; --hops picks the hop rows, e.g. --hops raw:1,faststream:1)

It starts ONE real local stack (`infra.stack.LocalStack`: NATS JetStream, SecantusDB, SeaweedFS) in a
temporary folder on free loopback ports (`tests.conftest.stack_env`), provisions the CODETUNE streams as
`codetune stack start` does (their config is not changed), runs both parts, stops the stack, deletes it all.

(a) Event hop. A bench stream `BENCH_HOP` (`bench.hop.>`, file storage) holds one input and one output
    subject per row. A worker PROCESS (like a stage worker) consumes the input through a durable pull
    consumer created with the project's settings (`events.streams.Consumer(...).config()`: explicit ack,
    ack_wait 30 s, max_deliver 5, max_ack_pending 1000), re-publishes the body to the output subject with
    `js.publish` (awaiting the PubAck, as a stage's declared publisher does) and acks:
    - faststream: a stage handler as the stages have it: a `handlers.common.pipeline_router()` subscriber
      with `jetstream_subscriber()`'s arguments (PullSub(batch_size, timeout=1), AckPolicy.MANUAL with
      FailurePolicy acking after the handler, the CloudEvents decoder) on the bench stream; the handler
      takes a pydantic body, `msg: MessageDep` and `services: ServicesDep` and calls `incoming(msg)`, wrapped
      by `handlers.common.handler` on a `NatsBroker` configured as `build_app` does (`apply_types=False`: no
      fast_depends per message, the body validated and the context values looked up by `handler`; access
      lines at DEBUG, dropped at the worker's INFO).
      faststream-before: the handler as the stages had it: FastStream's `NatsMessage` and a `Context()`
      client parameter, whose sync `use` fast_depends runs through `anyio.to_thread.run_sync` (a worker-thread
      round trip per parameter per message), and access lines at INFO (written to a file here).
      faststream-noctx: no context parameter at all and the access log off (`logger=None`): FastStream's
      own floor for a hop.
    - raw: nats-py `pull_subscribe_bind` + `fetch(batch_size, timeout=1)`; each message re-published, then
      acked; a batch's messages are handled concurrently, as FastStream does.
    The bench publishes with nats-py `publish_async`, the publish time (`perf_counter_ns`) in the body, and
    receives outputs on a core-NATS subscription: latency = output received - published.
    - events/s: `--events` messages published at once; messages / (last output - first publish).
      "burst p50/p99": latencies in that run, i.e. mostly time queued behind the backlog.
    - paced p50/p99: `--paced` messages at `--rate`/s, below every row's capacity: the latency of one hop
      in an unsaturated pipeline. batch_size 100 does NOT wait to fill its batch (nats-py's fetch returns
      what is pending), so it costs no latency at low rates; its price is that FastStream runs the whole
      batch concurrently and fetches again only when ALL of it is done (one slow message holds up to 99
      others; 100 validations at once for the datasets stage).
    - CPU us/event: the worker's user+sys CPU from subscribed to exit over all its messages (burst + paced).
      The most stable column: it does not depend on how the cores were shared.
    Ratios are row/raw at the same batch size (events/s < 1 and latency or CPU > 1: slower than raw).
    After each row its consumer is checked: nothing unconsumed, unacked or redelivered (else a WARNING).
    `BENCH_PROFILE=/tmp/fs.prof` writes a cProfile of each FastStream worker (to see where a hop goes).

(b) Upload. A `--size-mb` MB (10^6 bytes) file of valid `text`-format lines and one of 10 parts (10 x 16 MiB)
    are written to the temp folder; each operation then runs in its OWN fresh interpreter, same bucket:
    - `python -m infra.cli dataset upload FILE --no-wait` (`ObjectStore.put_stream`: minio
      `put_object(length=-1, part_size=PART_SIZE)` through a sha256-counting reader, then it publishes
      `dataset.uploaded`; no datasets worker runs, nothing validates it);
    - direct: a process that imports only `minio` and calls `put_object(length=-1, part_size=PART_SIZE)`.
    - baselines: `python -c 'import minio'` and an interpreter that only does the upload command's imports.
    Peak RSS and CPU are that process's own (`ru_maxrss` via `wait4`, spawned from a tiny launcher so this
    process's memory is not counted). "stream s" is how long the process held the data file open
    (psutil polling every 5 ms): the streaming itself; "wall s" adds interpreter start, imports, bucket
    check and (CLI) the NATS publish. Peak RSS equal for the 10-part file and the big one = constant memory.

Figures move 10-30% between runs on 2 shared cores (the load average is printed at the end): compare
rows and ratios within one run, not absolute numbers across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BENCH_STREAM = "BENCH_HOP"
IN = "bench.hop.in"
OUT = "bench.hop.out"
PAD = "x" * 120  # ~200-byte bodies, the size of a pipeline event
MB = 1_000_000
# side[-variant]:batch_size. faststream: a stage handler now; -before: as it was; -noctx: no context params.
HOPS = "raw:1,faststream:1,raw:100,faststream:100,faststream-before:1,faststream-noctx:1"


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _consumer(tag: str) -> Any:
    from events.streams import Consumer

    return Consumer(f"bench-{tag}", f"{IN}.{tag}", stream=BENCH_STREAM)


# ====================================================================== hop workers (child processes)


from handlers.common import MessageDep, ServicesDep  # noqa: E402  # the hop handler's hints, resolved at module level


class HopEvent(BaseModel):
    """A hop's body (module level: `handlers.common.handler` resolves its handler's type hints)."""

    i: int
    t0: int
    pad: str = ""


async def _serve_until_term(ctl: Path) -> None:
    """Report READY in the control file (stdout belongs to the framework's logs), run until SIGTERM."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    ctl.write_text("READY\n")
    await stop.wait()


async def _faststream_worker(tag: str, batch: int, ctl: Path, variant: str = "") -> None:
    """variant "": a stage handler as the stages have it (handlers.common.handler on a broker with
    apply_types=False: the message and the services looked up, `incoming(msg)`; build_app's access lines at
    DEBUG);
    "before": as the stages had it before (FastStream's `NatsMessage` and the publishing client as sync Context
    parameters, access lines at INFO); "noctx": no context parameter at all, access log off (the floor)."""
    import logging
    from typing import Annotated

    from faststream import Context, FastStream
    from faststream.nats import JStream, NatsBroker, NatsMessage

    from core.settings import Settings
    from events.client import CodeTuneClient, connect_options
    from handlers.common import (
        Services,
        handler,
        incoming,
        jetstream_subscriber,
        pipeline_router,
    )
    from storage.objects import ObjectStore

    settings = Settings(_env_file=None)
    consumer = _consumer(tag)
    out_subject = f"{OUT}.{tag}"

    router = pipeline_router()
    kw = jetstream_subscriber(consumer, batch_size=batch)
    kw["stream"] = JStream(BENCH_STREAM, subjects=[f"{IN}.>", f"{OUT}.>"], declare=False)

    clients: list[CodeTuneClient] = []

    if variant == "noctx":
        @router.subscriber(**kw, title=f"bench:{tag}")
        async def hop_noctx(event: HopEvent) -> None:
            await clients[0].publish_raw(out_subject, event.model_dump_json().encode())
    elif variant == "before":
        SyncClientDep = Annotated[CodeTuneClient, Context("client")]

        @router.subscriber(**kw, title=f"bench:{tag}")
        async def hop_before(event: HopEvent, msg: NatsMessage, client: SyncClientDep) -> None:
            incoming(msg)
            await client.publish_raw(out_subject, msg.body)
    elif variant == "di":
        @router.subscriber(**kw, title=f"bench:{tag}")
        async def hop_di(event: HopEvent, msg: MessageDep, services: ServicesDep) -> None:
            incoming(msg)
            await clients[0].publish_raw(out_subject, msg.body)
    else:
        @router.subscriber(**kw, title=f"bench:{tag}")
        @handler
        async def hop(event: HopEvent, msg: MessageDep, services: ServicesDep) -> None:
            incoming(msg)
            await clients[0].publish_raw(out_subject, msg.body)

    opts = connect_options(settings, "admin")
    servers = opts.pop("servers")
    opts.pop("name")
    if "user" in opts:  # as build_app: FastStream takes user/password as a security object
        from faststream.security import SASLPlaintext

        opts["security"] = SASLPlaintext(opts.pop("user"), opts.pop("password", ""))
    if variant == "noctx":
        opts["logger"] = None  # no access log at all
    # as build_app (the default access_log_level: DEBUG) and as the worker before (INFO)
    level = logging.INFO if variant == "before" else logging.DEBUG
    if not variant:  # as build_app: no per-message injection, the stage's `handler` resolves its parameters
        opts["apply_types"] = False
    broker = NatsBroker(servers, graceful_timeout=30.0, log_level=level, **opts)
    broker.include_router(router)
    app = FastStream(broker)

    @app.on_startup
    async def _startup() -> None:
        await broker.connect()
        clients.append(CodeTuneClient(broker.connection, source="codetune/bench"))
        app.context.set_global("client", clients[0])
        app.context.set_global("services", Services(settings, ObjectStore(settings)))

    await app.start()
    cpu0 = _cpu_s()
    await _serve_until_term(ctl)
    cpu = _cpu_s() - cpu0
    await app.stop()
    ctl.write_text("RESULT " + json.dumps({"cpu_s": cpu}) + "\n")


async def _raw_worker(tag: str, batch: int, ctl: Path) -> None:
    import nats

    from core.settings import Settings
    from events.client import connect_options

    settings = Settings(_env_file=None)
    consumer = _consumer(tag)
    out_subject = f"{OUT}.{tag}"
    nc = await nats.connect(**connect_options(settings, "admin"))
    js = nc.jetstream()
    psub = await js.pull_subscribe_bind(consumer.durable, BENCH_STREAM)

    async def handle(m: Any) -> None:
        await js.publish(out_subject, m.data)
        await m.ack()

    running = True

    async def loop() -> None:
        while running:
            try:
                msgs = await psub.fetch(batch, timeout=1.0)
            except TimeoutError:
                continue
            if len(msgs) == 1:
                await handle(msgs[0])
            else:
                await asyncio.gather(*(handle(m) for m in msgs))

    task = asyncio.create_task(loop())
    cpu0 = _cpu_s()
    await _serve_until_term(ctl)
    cpu = _cpu_s() - cpu0
    running = False
    with contextlib.suppress(Exception):
        await asyncio.wait_for(task, 3.0)
    await nc.close()  # not drain(): draining a pull subscription waits out its 30 s drain timeout
    ctl.write_text("RESULT " + json.dumps({"cpu_s": cpu}) + "\n")


# ====================================================================== upload workers (child processes)


# The reference for the upload command: `python -c DIRECT_PUT FILE KEY`, importing nothing but minio.
DIRECT_PUT = """import os, sys
from minio import Minio
env = os.environ
client = Minio(env["BENCH_S3_ENDPOINT"], access_key=env["BENCH_S3_ACCESS"], secret_key=env["BENCH_S3_SECRET"],
               secure=False, region=env["BENCH_S3_REGION"])
with open(sys.argv[1], "rb") as f:
    client.put_object(env["BENCH_S3_BUCKET"], sys.argv[2], f, length=-1, part_size=int(env["BENCH_PART_SIZE"]),
                      content_type="text/plain")
"""


# ====================================================================== driver: the stack


@contextlib.contextmanager
def local_stack(tmp: Path):
    """ONE real stack on free loopback ports under `tmp`; yields (env, settings); stopped on exit."""
    from infra.stack import LocalStack
    from tests.conftest import settings_from, stack_env

    env = stack_env(tmp / "stack") | {"CODETUNE_S3_BUCKET": "codetune-bench", "CODETUNE_MONGODB_DB": "codetune_bench"}
    settings = settings_from(env)
    st = LocalStack(settings)
    t0 = time.perf_counter()
    st.start(log=lambda _: None)
    try:
        asyncio.run(_provision(settings))
        print(f"stack started in {time.perf_counter() - t0:.1f}s (NATS {env['CODETUNE_NATS_URL']}, "
              f"S3 {env['CODETUNE_S3_ENDPOINT']}, home {tmp / 'stack'})", flush=True)
        yield env, settings
    finally:
        st.stop(log=lambda _: None)


async def _provision(settings: Any) -> None:
    """What `codetune stack start` does after starting: the CODETUNE streams the upload command publishes to."""
    from events.client import CodeTuneClient
    from events.streams import provision

    async with await CodeTuneClient.connect(settings, source="codetune/bench") as c:
        await provision(c.js)


def _child_env(env: dict[str, str]) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("CODETUNE_")} | env
    out["PYTHONPATH"] = str(ROOT) + os.pathsep + out.get("PYTHONPATH", "")
    return out


# ====================================================================== driver: (a) event hop


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


class Collector:
    def __init__(self) -> None:
        self.got: dict[int, int] = {}  # i -> receive time ns (first delivery)
        self.t0: dict[int, int] = {}
        self.expect = 0
        self.done = asyncio.Event()

    def reset(self, expect: int) -> None:
        self.got, self.t0, self.expect = {}, {}, expect
        self.done.clear()

    async def cb(self, msg: Any) -> None:
        now = time.perf_counter_ns()
        body = json.loads(msg.data)
        i = body["i"]
        if i not in self.got:
            self.got[i] = now
            self.t0[i] = body["t0"]
        if len(self.got) >= self.expect:
            self.done.set()

    def latencies_ms(self) -> list[float]:
        return [(self.got[i] - self.t0[i]) / 1e6 for i in self.got]


async def _publish(js: Any, subject: str, i: int) -> None:
    body = json.dumps({"i": i, "t0": time.perf_counter_ns(), "pad": PAD}).encode()
    await js.publish_async(subject, body)


async def _hop_one(nc: Any, js: Any, side: str, batch: int, n: int, paced: int, rate: float,
                   env: dict[str, str], logdir: Path) -> dict[str, Any]:
    tag = f"{side}-b{batch}"
    consumer = _consumer(tag)
    await js.add_consumer(BENCH_STREAM, consumer.config())
    col = Collector()
    sub = await nc.subscribe(f"{OUT}.{tag}", cb=col.cb)
    await nc.flush()
    logfile, ctl = logdir / f"{tag}.log", logdir / f"{tag}.ctl"
    log = logfile.open("wb")
    worker, _, variant = side.partition("-")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--worker", worker, "--variant", variant, "--tag", tag, "--batch", str(batch),
        "--ctl", str(ctl),
        stdout=log, stderr=subprocess.STDOUT, env=_child_env(env), cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not (ctl.exists() and ctl.read_text().startswith("READY")):
            if proc.returncode is not None or time.monotonic() > deadline:
                log.flush()
                raise RuntimeError(f"{tag} worker did not start: {logfile.read_text()[-3000:]}")
            await asyncio.sleep(0.02)
        subject = f"{IN}.{tag}"
        # Burst: everything at once; throughput = drain rate.
        col.reset(n)
        t_start = time.perf_counter_ns()
        for i in range(n):
            await _publish(js, subject, i)
        await js.publish_async_completed()
        await asyncio.wait_for(col.done.wait(), 120)
        burst = col.latencies_ms()
        eps = n / ((max(col.got.values()) - t_start) / 1e9)
        # Paced: a steady rate below capacity; latency = the hop itself.
        col.reset(paced)
        interval = 1.0 / rate
        t_begin = time.perf_counter()
        for i in range(paced):
            delay = t_begin + i * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await _publish(js, subject, n + i)
        await js.publish_async_completed()
        await asyncio.wait_for(col.done.wait(), 60)
        steady = col.latencies_ms()
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 40)
        log.close()
        await sub.unsubscribe()
    out = ctl.read_text() if ctl.exists() else ""
    res = next((json.loads(x[len("RESULT "):]) for x in out.splitlines() if x.startswith("RESULT ")), {})
    cpu = res.get("cpu_s")
    info = await js.consumer_info(BENCH_STREAM, consumer.durable)  # every message handled once and acked?
    if info.num_ack_pending or info.num_redelivered or info.num_pending:
        print(f"  WARNING {tag}: ack pending {info.num_ack_pending}, redelivered {info.num_redelivered}, "
              f"unconsumed {info.num_pending}", flush=True)
    return {
        "side": side, "batch": batch, "eps": eps,
        "burst_p50": _pct(burst, 0.5), "burst_p99": _pct(burst, 0.99),
        "p50": _pct(steady, 0.5), "p99": _pct(steady, 0.99), "mean": statistics.fmean(steady),
        "cpu_us": cpu / (n + paced) * 1e6 if cpu is not None else float("nan"),
    }


async def bench_hop(env: dict[str, str], settings: Any, n: int, paced: int, rate: float,
                    configs: list[tuple[str, int]], logdir: Path) -> list[dict[str, Any]]:
    import nats
    from nats.js.api import StorageType, StreamConfig

    from events.client import connect_options

    nc = await nats.connect(**connect_options(settings, "admin"))
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=BENCH_STREAM, subjects=["bench.hop.>"], storage=StorageType.FILE))
    rows = []
    try:
        for side, batch in configs:
            t0 = time.perf_counter()
            r = await _hop_one(nc, js, side, batch, n, paced, rate, env, logdir)
            print(f"  {side:16s} batch {batch:<3d}: {r['eps']:6.0f} events/s, paced p50 {r['p50']:.2f} ms, "
                  f"CPU {r['cpu_us']:.0f} us/event ({time.perf_counter() - t0:.0f}s)", flush=True)
            rows.append(r)
    finally:
        with contextlib.suppress(Exception):
            await js.delete_stream(BENCH_STREAM)
        await nc.drain()
    return rows


def print_hop(rows: list[dict[str, Any]], n: int, paced: int, rate: float) -> None:
    print(f"\n(a) one hop (consume → js.publish → ack): {n} msgs burst for events/s; "
          f"{paced} msgs at {rate:.0f}/s for paced latency")
    print(f"{'side':<17}{'batch':>6}{'events/s':>10}{'burst p50/p99 ms':>20}{'paced p50/p99 ms':>20}"
          f"{'CPU us/event':>14}")
    for r in rows:
        print(f"{r['side']:<17}{r['batch']:>6}{r['eps']:>10.0f}{r['burst_p50']:>11.0f} /{r['burst_p99']:>7.0f}"
              f"{r['p50']:>11.2f} /{r['p99']:>7.2f}{r['cpu_us']:>14.0f}")
    for fs in rows:
        raw = next((r for r in rows if r["side"] == "raw" and r["batch"] == fs["batch"]), None)
        if fs["side"] == "raw" or raw is None:
            continue
        print(f"{fs['side']}/raw, batch {fs['batch']}: events/s x{fs['eps'] / raw['eps']:.2f}, "
              f"paced p50 x{fs['p50'] / raw['p50']:.2f}, p99 x{fs['p99'] / raw['p99']:.2f}, "
              f"CPU/event x{fs['cpu_us'] / raw['cpu_us']:.2f}")


# ====================================================================== driver: (b) upload


# Spawns the measured command from a small interpreter and reports ITS rusage: a child forked straight from
# this (large) process would inherit this process's RSS into its ru_maxrss (Linux counts the pre-exec memory).
LAUNCHER = """import os, sys
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
_, st, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{ru.ru_maxrss} {ru.ru_utime + ru.ru_stime} {os.waitstatus_to_exitcode(st)}")
"""


def _run_child(cmd: list[str], env: dict[str, str], logfile: Path, watch: Path | None = None) -> dict[str, float]:
    """Run one operation in a fresh interpreter: wall time, its own peak RSS and CPU, and (psutil polling)
    how long it held `watch` open, i.e. the time it spent streaming that file."""
    import psutil

    result = logfile.with_suffix(".rusage")
    opened = closed = None
    with open(logfile, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", LAUNCHER, str(result), *cmd], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
        while proc.poll() is None:
            if watch is not None:
                with contextlib.suppress(psutil.Error):
                    kids = psutil.Process(proc.pid).children()
                    if kids and any(f.path == str(watch) for f in kids[0].open_files()):
                        now = time.perf_counter()
                        opened, closed = opened or now, now
            time.sleep(0.005)
        wall = time.perf_counter() - t0
    maxrss_kb, cpu, rc = result.read_text().split()
    if proc.returncode or int(rc):
        raise RuntimeError(f"{cmd[1:4]} exited {rc}: {logfile.read_text()[-2000:]}")
    stream = (closed - opened) if opened and closed else float("nan")
    return {"wall_s": wall, "stream_s": stream, "rss_mb": int(maxrss_kb) / 1024, "cpu_s": float(cpu),
            "before_s": (opened - t0) if opened else float("nan"),
            "after_s": (t0 + wall - closed) if closed else float("nan")}


def write_dataset(path: Path, size: int) -> int:
    """About `size` bytes of valid `text`-format lines (one example per line); returns the exact size."""
    words = ("def", "return", "class", "import", "lambda", "yield", "async", "await", "tensor", "token",
             "gradient", "adapter", "quantize", "merge", "prompt", "assistant")
    lines = []
    for i in range(40_000):
        n = 6 + (i * 7919) % 23
        lines.append(f"{i:06d} " + " ".join(words[(i + j * 5) % len(words)] for j in range(n)) + "\n")
    block = "".join(lines).encode()
    with open(path, "wb") as f:
        left = size
        while left >= len(block):
            f.write(block)
            left -= len(block)
        f.write(block[: block.rfind(b"\n", 0, left) + 1])
    return path.stat().st_size


def bench_upload(env: dict[str, str], settings: Any, size_mb: int, tmp: Path) -> list[tuple[str, dict[str, float]]]:
    from storage.objects import PART_SIZE

    cenv = _child_env(env) | {
        "BENCH_S3_ENDPOINT": settings.s3_endpoint, "BENCH_S3_ACCESS": settings.s3_access_key.get_secret_value(),
        "BENCH_S3_SECRET": settings.s3_secret_key.get_secret_value(), "BENCH_S3_REGION": settings.s3_region,
        "BENCH_S3_BUCKET": settings.s3_bucket, "BENCH_PART_SIZE": str(PART_SIZE),
        # the stack was configured from these (settings_from ignores .env); the CLI must use the same
        "CODETUNE_S3_ACCESS_KEY": settings.s3_access_key.get_secret_value(),
        "CODETUNE_S3_SECRET_KEY": settings.s3_secret_key.get_secret_value(),
    }
    py = sys.executable
    big, small = tmp / f"dataset-{size_mb}MB.txt", tmp / "dataset-10parts.txt"
    t0 = time.perf_counter()
    big_mb = write_dataset(big, size_mb * MB) / MB
    small_mb = write_dataset(small, 10 * PART_SIZE) / MB
    print(f"  wrote {big.name} ({big_mb:.0f} MB) and {small.name} ({small_mb:.0f} MB) in "
          f"{time.perf_counter() - t0:.1f}s", flush=True)
    cli_imports = ("import infra.cli, events.client, storage.objects; "
                   "from handlers.datasets.service import store_upload")
    upload = [py, "-m", "infra.cli", "dataset", "upload"]
    runs: list[tuple[str, list[str], Path | None, float]] = [
        ("python -c 'import minio'", [py, "-c", "import minio"], None, 0),
        ("upload command's imports only", [py, "-c", cli_imports], None, 0),
        (f"direct minio put_object {big_mb:.0f} MB", [py, "-c", DIRECT_PUT, str(big), "bench/direct.txt"], big,
         big_mb),
        (f"codetune dataset upload {big_mb:.0f} MB", [*upload, str(big), "--no-wait"], big, big_mb),
        (f"codetune dataset upload {small_mb:.0f} MB", [*upload, str(small), "--no-wait"], small, small_mb),
    ]
    out = []
    try:
        for i, (label, cmd, watch, mb) in enumerate(runs):
            r = _run_child(cmd, cenv, tmp / f"upload-{i}.log", watch) | {"mb": mb}
            phases = f" (before/after the stream {r['before_s']:.2f}s/{r['after_s']:.2f}s)" if watch else ""
            print(f"  {label}: {r['wall_s']:.2f}s{phases}, peak RSS {r['rss_mb']:.0f} MB", flush=True)
            out.append((label, r))
    finally:
        big.unlink(missing_ok=True)
        small.unlink(missing_ok=True)
    return out


def print_upload(rows: list[tuple[str, dict[str, float]]]) -> None:
    from storage.objects import PART_SIZE

    minio_base, cli_base, direct, cli, cli_small = (r for _, r in rows)
    print(f"\n(b) upload, put_object(length=-1, part_size={PART_SIZE // 2**20} MiB), same bucket, 1 MB = 10^6 bytes; "
          f"each operation in its own interpreter; stream s = time the file was held open (psutil, ±5 ms)")
    print(f"{'operation':<36}{'wall s':>8}{'stream s':>10}{'MB/s stream':>13}{'MB/s wall':>11}{'CPU s':>8}"
          f"{'peak RSS MB':>13}")
    for label, x in rows:
        mbs = f"{x['mb'] / x['stream_s']:.1f}" if x["mb"] else "-"
        wall_mbs = f"{x['mb'] / x['wall_s']:.1f}" if x["mb"] else "-"
        stream = f"{x['stream_s']:.2f}" if x["mb"] else "-"
        print(f"{label:<36}{x['wall_s']:>8.2f}{stream:>10}{mbs:>13}{wall_mbs:>11}{x['cpu_s']:>8.2f}"
              f"{x['rss_mb']:>13.0f}")
    print(f"codetune/direct: MB/s (stream) x{direct['stream_s'] / cli['stream_s']:.2f}, "
          f"MB/s (wall) x{direct['wall_s'] / cli['wall_s']:.2f}, peak RSS x{cli['rss_mb'] / direct['rss_mb']:.2f}; "
          f"peak RSS above the imports: codetune +{cli['rss_mb'] - cli_base['rss_mb']:.0f} MB, "
          f"direct +{direct['rss_mb'] - minio_base['rss_mb']:.0f} MB")
    print(f"constant memory: codetune peak RSS {cli_small['rss_mb']:.0f} MB for {cli_small['mb']:.0f} MB, "
          f"{cli['rss_mb']:.0f} MB for {cli['mb']:.0f} MB (x{cli['rss_mb'] / cli_small['rss_mb']:.2f} for "
          f"x{cli['mb'] / cli_small['mb']:.1f} the data)")


# ====================================================================== driver: (c) the datasets stage at load


def _stack_procs(home: Path) -> dict[str, Any]:
    """The stack's server processes (found by their home folder on the command line)."""
    import psutil

    out: dict[str, Any] = {}
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(home) not in cmd:
            continue
        for name in ("nats-server", "secantus", "weed"):
            if name in cmd and name not in out:
                out[name] = p
    return out


def _cpu_of(p: Any) -> float:
    import psutil

    with contextlib.suppress(psutil.Error):
        t = p.cpu_times()
        return t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)
    return 0.0


def _small_dataset(i: int) -> bytes:
    return "".join(f"example {i}-{j}: def f(x): return x * {j}\n" for j in range(20)).encode()


async def _phases(settings: Any, n: int) -> dict[str, float]:
    """One validation's parts, each timed alone and in sequence in this process (ms per operation)."""
    from events.client import CodeTuneClient
    from events.payloads import DatasetValidated
    from handlers.datasets.validate import validate_stream
    from storage.db import init_db
    from storage.documents import Dataset
    from storage.objects import ObjectStore

    store = ObjectStore(settings)
    mongo = await init_db(settings)
    out: dict[str, float] = {}
    try:
        async with await CodeTuneClient.connect(settings, source="codetune/bench", role="admin") as c:
            t = time.perf_counter()
            for i in range(n):
                await store.get_bytes(f"bench/load/{i}.txt")
            out["S3 get, one thread hop (ObjectStore.get_bytes)"] = (time.perf_counter() - t) / n * 1e3
            t = time.perf_counter()
            for i in range(n):
                chunks = [c async for c in store.iter_chunks(f"bench/load/{i}.txt")]
                del chunks
            out["S3 get as the stage reads it (iter_chunks)"] = (time.perf_counter() - t) / n * 1e3
            data = _small_dataset(0)

            async def one() -> Any:
                yield data

            t = time.perf_counter()
            for _ in range(n):
                report = await validate_stream(one(), "auto", 20)
            out["validate + profile (CPU only)"] = (time.perf_counter() - t) / n * 1e3
            assert report.profile is not None
            t = time.perf_counter()
            for i in range(n):
                await Dataset.upsert_by({"dataset_id": f"ds-phase-{i}"}, {
                    "name": "x.txt", "key": "bench/load/0.txt", "format": "text", "status": "validated",
                    "size": 1, "profile": report.profile.model_dump(), "line_errors": [], "error": None})
            out["MongoDB upsert, document returned (find_one_and_update)"] = (time.perf_counter() - t) / n * 1e3
            t = time.perf_counter()
            for i in range(n):
                await Dataset.upsert_by({"dataset_id": f"ds-phase-{i}"}, {
                    "name": "x.txt", "key": "bench/load/0.txt", "format": "text", "status": "validated",
                    "size": 1, "profile": report.profile.model_dump(), "line_errors": [], "error": None},
                    returning=False)
            out["MongoDB upsert as the stage writes it (update_one)"] = (time.perf_counter() - t) / n * 1e3
            t = time.perf_counter()
            for i in range(n):
                await c.publish(DatasetValidated(dataset_id=f"ds-phase-{i}", key="bench/load/0.txt", name="x.txt",
                                                 profile=report.profile))
            out["publish + PubAck (CodeTuneClient.publish)"] = (time.perf_counter() - t) / n * 1e3
    finally:
        await mongo.close()
    return out


async def bench_load(env: dict[str, str], settings: Any, n: int, workers: int, tmp: Path,
                     code_roots: list[tuple[str, Path]]) -> list[dict[str, Any]]:
    """`workers` real `codetune worker datasets` processes; `n` `dataset.uploaded` events published at once;
    events/s = n / (last answer - first publish). Once per code tree (this one, and e.g. main's)."""
    from events.client import CodeTuneClient
    from storage.objects import ObjectStore

    store = ObjectStore(settings)
    await store.ensure_bucket()
    t0 = time.perf_counter()
    sem = asyncio.Semaphore(8)

    async def put(i: int) -> None:
        async with sem:
            await store.put_bytes(f"bench/load/{i}.txt", _small_dataset(i), "text/plain")

    await asyncio.gather(*(put(i) for i in range(n)))
    print(f"  {n} small datasets ({len(_small_dataset(0))} bytes each) in the bucket in "
          f"{time.perf_counter() - t0:.1f}s", flush=True)
    rows = []
    async with await CodeTuneClient.connect(settings, source="codetune/bench", role="admin") as c:
        for run, (label, root) in enumerate(code_roots):
            rows.append(await _load_run(c, env, tmp, f"ds-load{run}-", label, root, n, workers))
    return rows


def _spawn_worker(root: Path, cenv: dict[str, str], logfile: Path, prof: str | None) -> subprocess.Popen[bytes]:
    pre = ["-m", "cProfile", "-o", f"{prof}/{logfile.stem}.prof"] if prof else []  # BENCH_LOAD_PROFILE=DIR
    with logfile.open("wb") as log:
        return subprocess.Popen([sys.executable, *pre, "-m", "infra.cli", "worker", "datasets"], cwd=root,
                                env=cenv, stdout=log, stderr=subprocess.STDOUT)


async def _load_run(c: Any, env: dict[str, str], tmp: Path, prefix: str, label: str, root: Path, n: int,
                    workers: int) -> dict[str, Any]:
    import psutil

    from events import subjects as sj
    from events.payloads import DatasetUploaded

    answers: dict[str, float] = {}
    done = asyncio.Event()
    failed = 0

    async def cb(msg: Any) -> None:
        nonlocal failed
        ds = json.loads(msg.data).get("dataset_id", "")
        if ds.startswith(prefix) and ds not in answers:
            answers[ds] = time.perf_counter()
            failed += msg.subject == sj.DATASET_FAILED
            if len(answers) >= n:
                done.set()

    subs = [await c.nc.subscribe(subj, cb=cb) for subj in (sj.DATASET_VALIDATED, sj.DATASET_FAILED)]
    cenv = _child_env(env)
    cenv["PYTHONPATH"] = str(root) + os.pathsep + cenv["PYTHONPATH"]
    logs = [tmp / f"{prefix}worker{w}.log" for w in range(workers)]
    procs = [_spawn_worker(root, cenv, lf, os.environ.get("BENCH_LOAD_PROFILE")) for lf in logs]
    try:
        deadline = time.monotonic() + 90
        while not all("ready" in lf.read_text(errors="replace") for lf in logs):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"{label}: datasets workers did not start: {logs[0].read_text()[-3000:]}")
            await asyncio.sleep(0.1)
        servers = _stack_procs(Path(env["CODETUNE_HOME"]))
        wprocs = [psutil.Process(p.pid) for p in procs]
        cpu0 = {k: _cpu_of(p) for k, p in servers.items()} | {"workers": sum(map(_cpu_of, wprocs))}
        me0 = _cpu_s()
        start = time.perf_counter()
        sem = asyncio.Semaphore(64)  # the uploads of many clients at once: the publisher is not the limit

        async def upload(i: int) -> None:
            async with sem:
                await c.publish(DatasetUploaded(dataset_id=f"{prefix}{i:05d}", key=f"bench/load/{i}.txt",
                                                name=f"d{i}.txt"))

        await asyncio.gather(*(upload(i) for i in range(n)))
        published = time.perf_counter()
        await asyncio.wait_for(done.wait(), 300)
        wall = max(answers.values()) - start
        cpu = {k: _cpu_of(p) - cpu0[k] for k, p in servers.items()}
        cpu["workers"] = sum(map(_cpu_of, wprocs)) - cpu0["workers"]
        cpu["bench (publisher)"] = _cpu_s() - me0
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                await asyncio.to_thread(p.wait, 40)
            except subprocess.TimeoutExpired:
                p.kill()
        for sub in subs:
            await sub.unsubscribe()
    eps = n / wall
    print(f"  {label}: {n} events, {workers} workers: {wall:.2f}s end to end, {eps:.0f} events/s "
          f"(published in {published - start:.2f}s), {failed} dataset.failed", flush=True)
    return {"label": label, "wall": wall, "eps": eps, "failed": failed,
            "cpu_ms": {k: v / n * 1e3 for k, v in cpu.items()}}


def print_load(rows: list[dict[str, Any]], phases: dict[str, float], n: int, workers: int) -> None:
    print(f"\n(c) the datasets stage at load: {n} small dataset.uploaded published at once, {workers} "
          f"`codetune worker datasets` processes; events/s = n / (last answer - first publish)")
    keys = list(rows[0]["cpu_ms"])
    print(f"{'code':<28}{'wall s':>8}{'events/s':>10}" + "".join(f"{k[:16]:>18}" for k in keys))
    for r in rows:
        print(f"{r['label']:<28}{r['wall']:>8.2f}{r['eps']:>10.0f}"
              + "".join(f"{r['cpu_ms'].get(k, float('nan')):>15.2f} ms" for k in keys))
    print("  (CPU ms per event of each process over the run; target: >= 200 events/s)")
    if len(rows) > 1:
        base = rows[-1]
        for r in rows[:-1]:
            print(f"{r['label']} / {base['label']}: events/s x{r['eps'] / base['eps']:.2f}")
    print("one validation's parts, each alone and sequential in one process (ms per operation):")
    for k, v in phases.items():
        print(f"  {k:<48}{v:>7.2f} ms")


# ====================================================================== main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="--events 1000 --paced 200 --size-mb 250")
    ap.add_argument("--events", type=int, default=5000, help="burst messages per hop configuration")
    ap.add_argument("--paced", type=int, default=500, help="paced messages per hop configuration")
    ap.add_argument("--rate", type=float, default=100.0, help="paced publish rate, messages/s")
    ap.add_argument("--hops", default=HOPS, help=f"side:batch_size list (default {HOPS})")
    ap.add_argument("--size-mb", type=int, default=500, help="size of the uploaded file, MB")
    ap.add_argument("--only", choices=["hop", "upload", "load"], help="run one part only")
    ap.add_argument("--load-events", type=int, default=500, help="(c) dataset.uploaded events published at once")
    ap.add_argument("--load-workers", type=int, default=2, help="(c) datasets worker processes")
    ap.add_argument("--baseline-tree", help="(c) also run the workers from this checkout (e.g. an export of "
                    "main), as the same-run baseline")
    ap.add_argument("--worker", choices=["faststream", "raw"], help=argparse.SUPPRESS)
    ap.add_argument("--tag", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--ctl", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker == "faststream":
        prof = os.environ.get("BENCH_PROFILE")  # a cProfile output path, to see where a FastStream hop goes
        if prof:
            import cProfile

            cProfile.runctx("asyncio.run(_faststream_worker(a.tag, a.batch, Path(a.ctl), a.variant))",
                            globals(), {"a": a}, prof)
        else:
            asyncio.run(_faststream_worker(a.tag, a.batch, Path(a.ctl), a.variant))
        return
    if a.worker == "raw":
        asyncio.run(_raw_worker(a.tag, a.batch, Path(a.ctl)))
        return
    if a.quick:
        a.events, a.paced, a.size_mb = 1000, 200, 250
    configs = [(side, int(b)) for side, _, b in (x.partition(":") for x in a.hops.split(","))]
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="codetune-bench-") as d, local_stack(Path(d)) as (env, settings):
        tmp = Path(d)
        hop = asyncio.run(bench_hop(env, settings, a.events, a.paced, a.rate, configs, tmp)) \
            if a.only in (None, "hop") else []
        up = bench_upload(env, settings, a.size_mb, tmp) if a.only in (None, "upload") else []
        load: list[dict[str, Any]] = []
        phases: dict[str, float] = {}
        if a.only in (None, "load"):
            roots = [("this tree", ROOT)]
            if a.baseline_tree:
                roots.append((f"baseline {Path(a.baseline_tree).name}", Path(a.baseline_tree).resolve()))
            load = asyncio.run(bench_load(env, settings, a.load_events, a.load_workers, tmp, roots))
            phases = asyncio.run(_phases(settings, 100))
    if hop:
        print_hop(hop, a.events, a.paced, a.rate)
    if up:
        print_upload(up)
    if load:
        print_load(load, phases, a.load_events, a.load_workers)
    print(f"\ntotal {time.perf_counter() - t0:.0f}s on {os.cpu_count()} cores; 1-min load average "
          f"{load0:.1f} at start, {os.getloadavg()[0]:.1f} at end (above the core count: other work shared them)")


if __name__ == "__main__":
    main()
