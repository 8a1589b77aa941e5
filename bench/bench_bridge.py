"""The webhook bridge's two costs: a signed webhook into JetStream vs a direct nats-py publish, and a big upload.

Run from the repository root (about 1.5 minutes on 2 CPU cores; `--quick` about 30 s):

    .venv/bin/python bench/bench_bridge.py            # = --requests 2000 --concurrency 16 --size-mb 500
    .venv/bin/python bench/bench_bridge.py --quick    # = --requests 500 --size-mb 100

It starts ONE real local stack (`infra.stack.LocalStack`: NATS JetStream, SecantusDB, SeaweedFS) in a
temporary folder on free loopback ports (`tests.conftest.stack_env`), provisions the streams, runs the bridge
as its own process (`python -m handlers.bridge`, bearer token + webhook secret set, access log off), and
drives it over loopback with httpx. Everything is stopped and deleted at the end.

(a) Webhooks: `--requests` POSTs of a `tuning.cancel.requested` payload (~60 bytes), `--concurrency` in
    flight (one keep-alive HTTP/1.1 connection each, a minimal asyncio client: httpx would cost more CPU than
    the bridge itself), to `POST /events/tuning.cancel.requested`:
    - standard:  Standard Webhooks signature (HMAC-SHA256 over id.timestamp.body), a fresh `webhook-id`
                 each, so every request also reserves and stores an idempotency receipt (NATS KV create +
                 put) around its JetStream publish;
    - github:    `X-Hub-Signature-256`, no delivery id: signature check + publish, no receipt;
    - direct:    the same events published with nats-py `js.publish` (same body, CloudEvents headers and
                 `Nats-Msg-Id`), the same concurrency, each awaiting its PubAck: what the bridge wraps.
    - floor:     `GET /healthz` through the same client and server: the HTTP stack alone (no NATS).
    Latency = request sent → answer (202 / PubAck) received; req/s = requests / wall time of the run. Each
    run is checked: exactly `--requests` new messages in the stream. CPU ms/req = user+sys CPU of the bridge
    process, of this (load-generating) process and of the stack's nats-server over the run, divided by the
    requests. "vs /healthz req/s" is the issue's ratio (target: a signed webhook >= 0.6x the floor).
    `--only webhooks` skips (b); `BENCH_PROFILE=PATH` writes a cProfile of each bridge process.
(b) Upload: a `--size-mb` MB (10^6 bytes) text dataset written to the temp folder, POSTed as multipart
    (httpx streams the file) to `POST /api/v1/datasets/upload` of a FRESH bridge process; MB/s over the
    request's wall time; the bridge process's RSS polled every 10 ms (psutil) and its kernel peak
    (`VmHWM`, since process start) against its RSS before the upload. The object's size in the bucket is
    checked. For reference, the same file through `ObjectStore.put_file` (minio, in this process).

The load generator runs on the same cores as the bridge, NATS and S3: compare rows within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.settings import Settings  # noqa: E402
from events import subjects as sj  # noqa: E402
from events.client import CodeTuneClient  # noqa: E402
from events.envelope import ce_headers, new_event_id  # noqa: E402
from events.streams import EVENTS, provision  # noqa: E402
from handlers.bridge.signatures import sign_github, sign_standard  # noqa: E402
from storage.objects import ObjectStore  # noqa: E402
from tests.conftest import free_port, settings_from, stack_env  # noqa: E402

TOKEN = "bench-token"
SECRET = "whsec_YmVuY2gtd2ViaG9vay1zZWNyZXQtMDEyMzQ1Njc4OQ=="
SUBJECT = sj.TUNING_CANCEL_REQUESTED


# --------------------------------------------------------------------------- processes


@contextlib.contextmanager
def bridge_process(env: dict[str, str], log: Path) -> Iterator[tuple[str, psutil.Process]]:
    port = free_port()
    penv = {**{k: v for k, v in os.environ.items() if not k.startswith("CODETUNE_")}, **env,
            "CODETUNE_BRIDGE_PORT": str(port), "CODETUNE_BRIDGE_TOKEN": TOKEN, "CODETUNE_WEBHOOK_SECRET": SECRET}
    with open(log, "ab") as out:
        prof = os.environ.get("BENCH_PROFILE")  # a cProfile output path for the bridge process
        pre = ["-m", "cProfile", "-o", f"{prof}.{log.stem}"] if prof else []
        proc = subprocess.Popen([sys.executable, *pre, "-m", "handlers.bridge", "--log-level", "warning"], cwd=ROOT,
                                env=penv, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bridge did not start; see {log}")
            time.sleep(0.1)
        yield url, psutil.Process(proc.pid)
    finally:
        # SIGINT when profiling: uvicorn re-raises the signal it caught once it has shut down, and cProfile
        # writes its file on the KeyboardInterrupt that SIGINT becomes (SIGTERM would end it unwritten)
        proc.send_signal(signal.SIGINT if prof else signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def hwm_bytes(proc: psutil.Process) -> int:
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class RssPoller:
    def __init__(self, proc: psutil.Process, every_s: float = 0.01) -> None:
        self.proc, self.every_s, self.peak = proc, every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.every_s)

    def __enter__(self) -> RssPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------- (a) webhooks


class RawHTTP:
    """A minimal HTTP/1.1 keep-alive connection: costs the load generator ~0.1 ms CPU a request where httpx
    costs ~2 ms, so on 2 shared cores the figures are the bridge's rather than the client's."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> RawHTTP:
        host, port = url.removeprefix("http://").split(":")
        return cls(*await asyncio.open_connection(host, int(port)))

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, bytes]:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.writer.write(f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\n{head}\r\n"
                          .encode() + body)
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


One = Callable[[RawHTTP | None, int], Awaitable[None]]


async def run_load(url: str, n: int, concurrency: int, one: One, http: bool = True) -> tuple[float, list[float]]:
    latencies: list[float] = []
    counter = iter(range(n))
    conns = [await RawHTTP.open(url) if http else None for _ in range(concurrency)]

    async def worker(conn: RawHTTP | None) -> None:
        for i in counter:
            start = time.perf_counter()
            await one(conn, i)
            latencies.append(time.perf_counter() - start)

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    wall = time.perf_counter() - started
    for c in conns:
        if c is not None:
            c.close()
    return wall, latencies


def body_for(i: int) -> bytes:
    return json.dumps({"job_id": f"job-bench-{i:08d}"}).encode()


async def stored(client: CodeTuneClient) -> int:
    info = await client.js.stream_info(EVENTS.name, subjects_filter=SUBJECT)
    return (info.state.subjects or {}).get(SUBJECT, 0)


def cpu_s(proc: psutil.Process | None) -> float:
    if proc is None:
        return 0.0
    t = proc.cpu_times()
    return t.user + t.system


def nats_server(home: Path) -> psutil.Process | None:
    """The stack's nats-server (its config lives under the stack's home)."""
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "nats-server" in cmd and str(home) in cmd:
            return p
    return None


async def webhooks(url: str, bridge: psutil.Process, client: CodeTuneClient, n: int, concurrency: int,
                   nats: psutil.Process | None = None) -> list[dict[str, Any]]:
    rows = []

    async def standard(conn: RawHTTP | None, i: int) -> None:
        assert conn is not None
        body, msg_id, ts = body_for(i), f"msg_{uuid.uuid4().hex}", int(time.time())
        headers = {"webhook-id": msg_id, "webhook-timestamp": str(ts), "content-type": "application/json",
                   "webhook-signature": sign_standard(SECRET, msg_id, ts, body)}
        status, answer = await conn.request("POST", f"/events/{SUBJECT}", headers, body)
        assert status == 202, answer

    async def github(conn: RawHTTP | None, i: int) -> None:
        assert conn is not None
        body = body_for(i)
        headers = {"X-Hub-Signature-256": sign_github(SECRET, body), "content-type": "application/json"}
        status, answer = await conn.request("POST", f"/events/{SUBJECT}", headers, body)
        assert status == 202, answer

    async def floor(conn: RawHTTP | None, i: int) -> None:
        assert conn is not None
        status, _ = await conn.request("GET", "/healthz", {})
        assert status == 200

    async def direct(_: RawHTTP | None, i: int) -> None:
        event_id = new_event_id()
        ack = await client.js.publish(SUBJECT, body_for(i), headers=ce_headers(SUBJECT, event_id, "bench"))
        assert not ack.duplicate

    await run_load(url, min(200, n), concurrency, github)  # warm-up: connections, caches
    me = psutil.Process()
    for name, one, server in (
        ("bridge, Standard Webhooks + receipt", standard, bridge), ("bridge, GitHub signature", github, bridge),
        ("bridge GET /healthz (HTTP floor)", floor, bridge), ("nats-py js.publish (direct)", direct, None),
    ):
        before, cpu_server, cpu_client, cpu_nats = await stored(client), cpu_s(server), cpu_s(me), cpu_s(nats)
        wall, lat = await run_load(url, n, concurrency, one, http=server is not None)
        cpu_server, cpu_client = cpu_s(server) - cpu_server, cpu_s(me) - cpu_client
        cpu_nats = cpu_s(nats) - cpu_nats
        published = await stored(client) - before
        assert published == (0 if one is floor else n), f"{name}: {published} new messages, not {n}"
        q = statistics.quantiles(lat, n=100)
        rows.append({"row": name, "req/s": n / wall, "p50 ms": statistics.median(lat) * 1e3,
                     "p99 ms": q[98] * 1e3, "max ms": max(lat) * 1e3,
                     "bridge CPU ms/req": cpu_server / n * 1e3 if server else "-",
                     "client CPU ms/req": cpu_client / n * 1e3,
                     "nats-server CPU ms/req": cpu_nats / n * 1e3 if nats else "-"})
    return rows


# --------------------------------------------------------------------------- (b) upload


def write_dataset(path: Path, size: int) -> None:
    line = b"The capital of France is Paris. The sky is blue and the grass is green; snow is white.\n"
    block = line * (1024 * 1024 // len(line))
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(block[:left])
            left -= min(left, len(block))


def upload(url: str, path: Path) -> tuple[float, dict[str, Any]]:
    with open(path, "rb") as f, httpx.Client(base_url=url, timeout=600,
                                             headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        start = time.perf_counter()
        r = http.post("/api/v1/datasets/upload", files={"file": (path.name, f, "text/plain")})
        wall = time.perf_counter() - start
    r.raise_for_status()
    return wall, r.json()


# --------------------------------------------------------------------------- main


def table(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    widths = [max(len(c), *(len(fmt(r[c])) for r in rows)) for c in cols]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(fmt(r[c]).ljust(w) for c, w in zip(cols, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def fmt(v: Any) -> str:
    return f"{v:,.1f}" if isinstance(v, float) else str(v)


async def main_async(args: argparse.Namespace, env: dict[str, str], settings: Settings, tmp: Path) -> None:
    client = await CodeTuneClient.connect(settings, source="bench")
    try:
        await provision(client.js)
        with bridge_process(env, tmp / "bridge-a.log") as (url, bridge):
            rows = await webhooks(url, bridge, client, args.requests, args.concurrency, nats_server(tmp))
        direct, floor = rows[-1], rows[-2]
        for r in rows:
            r["vs direct req/s"] = f"{r['req/s'] / direct['req/s']:.2f}x"
            r["vs direct p99"] = f"{r['p99 ms'] / direct['p99 ms']:.2f}x"
            r["vs /healthz req/s"] = f"{r['req/s'] / floor['req/s']:.2f}x"
        print(f"\n(a) {args.requests} webhooks into JetStream, concurrency {args.concurrency}, loopback")
        print(table(rows))
        print("target: a signed webhook >= 0.60x the /healthz floor's req/s")

        if args.only == "webhooks":
            return
        size = args.size_mb * 1_000_000
        data = tmp / "big.txt"
        write_dataset(data, size)
        with bridge_process(env, tmp / "bridge-b.log") as (url, proc):
            base = proc.memory_info().rss
            with RssPoller(proc) as poll:
                wall, answer = await asyncio.to_thread(upload, url, data)
            hwm = hwm_bytes(proc)
        store = ObjectStore(settings)
        stat = await store.stat(answer["key"])
        assert stat.size == size == answer["size"], (stat.size, size, answer)
        start = time.perf_counter()
        await store.put_file("bench/direct.txt", data)
        direct_s = time.perf_counter() - start
        mb = size / 1e6
        print(f"\n(b) {args.size_mb} MB multipart upload through the bridge (fresh bridge process)")
        print(table([
            {"row": "bridge POST /api/v1/datasets/upload", "MB/s": mb / wall, "wall s": wall,
             "RSS before MB": base / 2**20, "peak RSS polled MB": poll.peak / 2**20, "VmHWM MB": hwm / 2**20},
            {"row": "ObjectStore.put_file (minio, in-process)", "MB/s": mb / direct_s, "wall s": direct_s,
             "RSS before MB": "-", "peak RSS polled MB": "-", "VmHWM MB": "-"},
        ]))
        print(f"\nload average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    finally:
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--size-mb", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="--requests 500 --size-mb 100")
    parser.add_argument("--only", choices=["webhooks"], help="(a) only: no upload")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.size_mb = 500, 100
    from infra.stack import LocalStack

    tmp = Path(tempfile.mkdtemp(prefix="codetune-bench-bridge-"))
    env = stack_env(tmp / "stack")
    settings = settings_from(env)
    stack = LocalStack(settings)
    try:
        stack.start(log=lambda m: print(m, file=sys.stderr))
        asyncio.run(main_async(args, env, settings, tmp))
    finally:
        stack.stop(log=lambda _: None)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
