"""The bridge's connections, opened in the app's lifespan and injected into routes as dependencies.

Dependencies are `async def`: FastAPI runs a plain `def` dependency in a worker thread, a thread hop (and a
GIL hand-over) per dependency per request that cost the webhook route a 10x lower throughput on 2 cores.

NATS is required at start (the bridge exists to publish); MongoDB and S3 are connected in the background
and retried, so the process starts, answers liveness, and reports each dependency separately on
readiness while one of them is down. Routes that need MongoDB answer 503 until it is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from pymongo import AsyncMongoClient

from core.settings import Settings
from events.client import CodeTuneClient
from events.streams import RetryPolicy, provision
from handlers.bridge.receipts import Receipts
from storage.objects import ObjectStore

log = logging.getLogger("codetune.bridge")

RETRY_S = 2.0


@dataclass
class Background:
    """A dependency connected in the background: ready once `connect` succeeded; the last error otherwise."""

    name: str
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    error: str | None = "connecting"
    task: asyncio.Task[None] | None = None

    def start(self, connect: Callable[[], Awaitable[None]]) -> None:
        async def loop() -> None:
            while True:
                try:
                    await connect()
                except Exception as e:
                    self.error = f"{type(e).__name__}: {e}"[:300]
                    log.warning("%s not ready, retrying in %.0fs: %s", self.name, RETRY_S, self.error)
                    await asyncio.sleep(RETRY_S)
                    continue
                self.error = None
                self.ready.set()
                return

        self.task = asyncio.create_task(loop(), name=f"connect-{self.name}")

    async def stop(self) -> None:
        if self.task and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


@dataclass
class Services:
    settings: Settings
    client: CodeTuneClient
    receipts: Receipts
    store: ObjectStore
    mongodb: Background
    s3: Background
    mongo: AsyncMongoClient[Any] | None = None

    @classmethod
    async def start(cls, settings: Settings) -> Services:
        client = await CodeTuneClient.connect(settings, source="codetune/bridge", name="codetune-bridge",
                                              max_reconnect_attempts=-1)
        replicas = settings.nats_replicas
        await provision(client.js, RetryPolicy.from_settings(settings), replicas)
        services = cls(settings=settings, client=client, receipts=await Receipts.open(client.js, replicas=replicas),
                       store=ObjectStore(settings), mongodb=Background("mongodb"), s3=Background("s3"))
        services.mongodb.start(services._connect_mongo)
        services.s3.start(services.store.ensure_bucket)
        return services

    async def _connect_mongo(self) -> None:
        from storage.db import init_db

        self.mongo = await init_db(self.settings)

    async def stop(self) -> None:
        await self.mongodb.stop()
        await self.s3.stop()
        if self.mongo is not None:
            await self.mongo.close()
        await self.client.close()


async def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_client(services: ServicesDep) -> CodeTuneClient:
    return services.client


async def get_store(services: ServicesDep) -> ObjectStore:
    return services.store


async def get_receipts(services: ServicesDep) -> Receipts:
    return services.receipts


async def get_settings(services: ServicesDep) -> Settings:
    return services.settings


async def require_mongodb(services: ServicesDep) -> None:
    if not services.mongodb.ready.is_set():
        raise HTTPException(503, f"MongoDB is not ready: {services.mongodb.error}")


ClientDep = Annotated[CodeTuneClient, Depends(get_client)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]
ReceiptsDep = Annotated[Receipts, Depends(get_receipts)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MongoDB = Depends(require_mongodb)
