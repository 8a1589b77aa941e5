"""Liveness and readiness (no token needed).

- liveness  `GET /api/v1/health/pulse`, `GET /healthz`: the process answers; touches no dependency.
- readiness `GET /api/v1/health/status`, `GET /readyz`: NATS (a round trip + JetStream), MongoDB (ping)
  and S3 (the bucket) checked concurrently, each reported separately with its latency or error; 200 when
  all are up, 503 otherwise.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from handlers.bridge.services import Services, ServicesDep

router = APIRouter(tags=["health"])

CHECK_TIMEOUT_S = 2.0
VERSION = "0.1.0"


class Check(BaseModel):
    ok: bool
    latency_ms: float | None = None
    error: str | None = None


class Readiness(BaseModel):
    status: str
    nats: Check
    mongodb: Check
    s3: Check


async def probe(check: Callable[[], Awaitable[object]]) -> Check:
    start = time.perf_counter()
    try:
        await asyncio.wait_for(check(), CHECK_TIMEOUT_S)
    except TimeoutError:
        return Check(ok=False, error=f"no answer in {CHECK_TIMEOUT_S:.0f}s")
    except Exception as e:
        return Check(ok=False, error=f"{type(e).__name__}: {e}"[:300])
    return Check(ok=True, latency_ms=round((time.perf_counter() - start) * 1000, 2))


async def nats_check(services: Services) -> None:
    if not services.client.nc.is_connected:
        raise ConnectionError("not connected")
    await services.client.js.account_info()


async def mongodb_check(services: Services) -> None:
    if services.mongo is None or not services.mongodb.ready.is_set():
        raise ConnectionError(services.mongodb.error or "not connected")
    await services.mongo.admin.command("ping")


async def readiness(services: Services) -> Readiness:
    nats, mongodb, s3 = await asyncio.gather(
        probe(lambda: nats_check(services)), probe(lambda: mongodb_check(services)), probe(services.store.ping))
    ok = nats.ok and mongodb.ok and s3.ok
    return Readiness(status="ok" if ok else "unavailable", nats=nats, mongodb=mongodb, s3=s3)


@router.get("/api/v1/health/pulse")
@router.get("/healthz", include_in_schema=False)
async def pulse() -> dict[str, Any]:
    """Liveness."""
    return {"status": "ok", "service": "codetune-bridge", "version": VERSION}


@router.get("/api/v1/health/status", response_model=Readiness, responses={503: {"model": Readiness}})
@router.get("/readyz", include_in_schema=False)
async def status(services: ServicesDep) -> JSONResponse:
    """Readiness: NATS, MongoDB and S3, each separately."""
    report = await readiness(services)
    return JSONResponse(report.model_dump(), status_code=200 if report.status == "ok" else 503)
