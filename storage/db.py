"""MongoDB connection and Beanie init. Create it inside the running event loop (the client binds to it)."""

from __future__ import annotations

from beanie import init_beanie
from pymongo import AsyncMongoClient

from core.settings import Settings
from storage.documents import DOCUMENTS


async def init_db(settings: Settings) -> AsyncMongoClient:
    client: AsyncMongoClient = AsyncMongoClient(
        settings.mongodb_uri, tz_aware=True, serverSelectionTimeoutMS=5000, appname="codetune"
    )
    await init_beanie(database=client[settings.mongodb_db], document_models=DOCUMENTS)
    return client
