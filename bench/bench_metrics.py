"""What the message metrics cost a hop: FastStream's Prometheus middleware (handlers.metrics.MessageMetrics)
on a stage-style subscriber that consumes one message and publishes one, with and without it.

    .venv/bin/python bench/bench_metrics.py            # 5 rounds of 3000 messages per variant
    .venv/bin/python bench/bench_metrics.py --messages 1000 --rounds 3

In memory (FastStream's TestNatsBroker, no server), so the difference between the two rows is the
middleware's own CPU per hop (one consume scope + one publish scope: counters, gauges, histograms, the
subject label); a real hop over NATS costs far more (README "Scaling out", bench_datasets.py).
Prints the median µs per hop of each variant and the difference.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from faststream.nats import NatsBroker, TestNatsBroker
from prometheus_client import CollectorRegistry

from handlers.metrics import MessageMetrics


async def round_us(with_metrics: bool, n: int) -> float:
    middlewares = [MessageMetrics(registry=CollectorRegistry(), app_name="bench")] if with_metrics else []
    broker = NatsBroker(middlewares=middlewares)
    out = broker.publisher("tuning.progress.ftjob-bench")

    @broker.subscriber("dataset.uploaded")
    async def hop(body: dict) -> None:
        await out.publish(body)

    async with TestNatsBroker(broker) as br:
        for _ in range(200):  # warm up
            await br.publish({"dataset_id": "d"}, "dataset.uploaded")
        started = time.perf_counter()
        for _ in range(n):
            await br.publish({"dataset_id": "d"}, "dataset.uploaded")
        return (time.perf_counter() - started) / n * 1e6


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    rows: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(a.rounds):  # interleaved, so a change in the machine's load hits both alike
        for variant in (False, True):
            rows[variant].append(await round_us(variant, a.messages))
    plain, metered = statistics.median(rows[False]), statistics.median(rows[True])
    print(f"without metrics: {plain:7.1f} us/hop (median of {a.rounds} x {a.messages})")
    print(f"with metrics:    {metered:7.1f} us/hop")
    print(f"middleware:      {metered - plain:7.1f} us/hop (consume + publish)")


if __name__ == "__main__":
    asyncio.run(main())
