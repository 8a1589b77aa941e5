"""Shared fixtures: ONE real local stack (NATS JetStream, SecantusDB, SeaweedFS) per test session.

The stack runs on free loopback ports in a temporary folder, so it never collides with a developer's
own `codetune stack`. Tests talk to it like users do: through events, the CLI's functions, the bucket
and MongoDB.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("CODETUNE_BUILD_APP", "0")  # importing handlers.app must not build an app

ROOT = Path(__file__).resolve().parents[1]


def _free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weed_base() -> int:
    for _ in range(200):
        b = random.randrange(20000, 29000, 20)
        if all(_free(b + i) for i in range(10)) and all(_free(b + 10000 + i) for i in range(4)):
            return b
    raise RuntimeError("no free port range for SeaweedFS")


def stack_env(home: Path) -> dict[str, str]:
    """Environment for a stack on fresh ports under `home` (also used by subprocess workers)."""
    nats, mon, mongo, s3 = free_port(), free_port(), free_port(), free_port()
    env = {
        "CODETUNE_HOME": str(home),
        "CODETUNE_NATS_URL": f"nats://127.0.0.1:{nats}",
        "CODETUNE_STACK_NATS_PORT": str(nats),
        "CODETUNE_STACK_NATS_MONITOR_PORT": str(mon),
        "CODETUNE_MONGODB_URI": f"mongodb://127.0.0.1:{mongo}/?directConnection=true",
        "CODETUNE_MONGODB_DB": "codetune_test",
        "CODETUNE_STACK_MONGO_PORT": str(mongo),
        "CODETUNE_S3_ENDPOINT": f"127.0.0.1:{s3}",
        "CODETUNE_STACK_S3_PORT": str(s3),
        "CODETUNE_STACK_WEED_BASE_PORT": str(_weed_base()),
        "CODETUNE_S3_BUCKET": "codetune-test",
    }
    secantus = os.environ.get("CODETUNE_STACK_SECANTUS_PYTHON") or str(
        ROOT / ".codetune" / "secantus-venv" / "bin" / "python"
    )
    if Path(secantus).exists():
        env["CODETUNE_STACK_SECANTUS_PYTHON"] = secantus
    return env


def settings_from(env: dict[str, str]):
    from infra.settings import Settings

    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return Settings(_env_file=None)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def stack_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def env(stack_home: Path) -> Iterator[dict[str, str]]:
    """Start the real stack once; yields the environment that points at it."""
    from infra.stack import LocalStack

    e = stack_env(stack_home)
    st = LocalStack(settings_from(e))
    st.start(log=lambda m: print(m, file=sys.stderr))
    try:
        yield e
    finally:
        st.stop(log=lambda _: None)


@pytest.fixture(scope="session")
def settings(env: dict[str, str]):
    return settings_from(env)


@pytest.fixture(scope="session")
async def db(settings) -> AsyncIterator[None]:
    from storage.db import init_db

    client = await init_db(settings)
    yield
    await client.close()


@pytest.fixture(scope="session")
async def store(settings):
    from storage.objects import ObjectStore

    s = ObjectStore(settings)
    await s.ensure_bucket()
    return s


@pytest.fixture(scope="session")
async def client(settings) -> AsyncIterator:
    from events.client import CodeTuneClient
    from events.streams import provision

    c = await CodeTuneClient.connect(settings, source="codetune/tests")
    await provision(c.js)
    yield c
    await c.close()


@pytest.fixture(scope="session")
async def workers(settings, db, client) -> AsyncIterator[object]:
    """Every light stage (datasets, models, export, serving) running in-process on the real stack."""
    from handlers.app import build_app

    app = build_app(["datasets"], settings)
    await app.start()
    yield app
    await app.stop()


@pytest.fixture
def uid() -> str:
    return uuid.uuid4().hex[:12]


def run_async(coro):
    return asyncio.get_event_loop().run_until_complete(coro)
