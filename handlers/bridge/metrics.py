"""The bridge's metrics (README "Metrics"): request latency by route and status, and `GET /metrics`.

`/metrics` is public, like `/healthz` (Prometheus scrapes without credentials); it shows counts and
timings, never a body, header, token or id. Jobs by status are counted from MongoDB on each scrape.
"""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from handlers.bridge.services import ServicesDep
from handlers.metrics import BRIDGE_REQUEST_SECONDS, JOBS, JOBS_QUERY_TIMEOUT_S, bridge_registry
from storage.jobs import status_counts

log = logging.getLogger("codetune.bridge")


class RequestLatency:
    """ASGI middleware: `codetune_bridge_request_duration_seconds` by method, route template and status
    (the matched route's path, e.g. `/api/v1/tuning/{job_id}`; `unmatched` for a path no route has, so a
    scan of random paths adds no series)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            BRIDGE_REQUEST_SECONDS.labels(method=scope["method"], route=route, status=str(status)).observe(
                time.perf_counter() - started)


def install(app: FastAPI) -> None:
    """Time every request (outermost: a refused origin or an oversize body is timed too) and serve
    `GET /metrics` from this app's own registry."""
    registry = bridge_registry()
    app.add_middleware(RequestLatency)

    @app.get("/metrics", include_in_schema=False)
    async def metrics(services: ServicesDep) -> Response:
        try:
            if services.mongo is None or not services.mongodb.ready.is_set():
                raise ConnectionError(services.mongodb.error or "not connected")
            counts = await asyncio.wait_for(status_counts(), JOBS_QUERY_TIMEOUT_S)
        except Exception as e:  # MongoDB down or slow: no job series rather than stale ones
            log.warning("jobs by status not counted for /metrics: %s", f"{type(e).__name__}: {e}"[:300])
            JOBS.clear()
        else:
            for status, n in counts.items():
                JOBS.labels(status=status).set(n)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
