"""MongoDB connection and Beanie init. Create it inside the running event loop (the client binds to it).

Index sync (Beanie's `create_indexes` for every document) costs a round trip per index on every start
(~0.1 s on the local stack): a worker woken by its first message would pay it each time. So the first
process that syncs the indexes records the digest of the document definitions it synced in the
`codetune_meta` collection, and later starts with the same definitions skip the sync (one `find_one`
instead). A changed storage/documents.py (or Beanie) changes the digest, and the next start syncs again.
"""

from __future__ import annotations

import hashlib
import inspect
from datetime import UTC, datetime
from importlib.metadata import version

from beanie import init_beanie
from pymongo import AsyncMongoClient

from core.settings import Settings
from storage import documents
from storage.documents import DOCUMENTS

META_COLLECTION = "codetune_meta"
_INDEX_MARKER = "indexes"


def documents_digest() -> str:
    """Digest of what the indexes derive from: the document module's source and Beanie's version."""
    source = inspect.getsource(documents).encode()
    return hashlib.sha256(source + b"\0beanie " + version("beanie").encode()).hexdigest()


async def init_db(settings: Settings, *, sync_indexes: bool | None = None) -> AsyncMongoClient:
    """Connect and initialise Beanie. `sync_indexes`: True always syncs the indexes, False never, None
    (default) syncs them unless they were synced for these exact document definitions."""
    client: AsyncMongoClient = AsyncMongoClient(
        settings.mongodb_uri, tz_aware=True, serverSelectionTimeoutMS=5000, appname="codetune"
    )
    db = client[settings.mongodb_db]
    digest = documents_digest()
    if sync_indexes is None:
        marker = await db[META_COLLECTION].find_one({"_id": _INDEX_MARKER})
        sync_indexes = marker is None or marker.get("digest") != digest
    await init_beanie(database=db, document_models=DOCUMENTS, skip_indexes=not sync_indexes)
    if sync_indexes:
        await db[META_COLLECTION].update_one(
            {"_id": _INDEX_MARKER}, {"$set": {"digest": digest, "synced_at": datetime.now(UTC)}}, upsert=True)
    return client
