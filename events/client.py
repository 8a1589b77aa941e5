"""A small typed client for the contract: publish, request, wait for.

Used by the CLI, the webhook bridge, the handlers and the tests. It speaks plain nats-py and imports
no broker framework, so any Python program can drive CodeTune with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck
from pydantic import BaseModel

from core import tracing
from core.errors import CodeTuneError
from core.settings import Settings
from events import subjects as s
from events.envelope import ce_headers, new_event_id, unwrap

T = TypeVar("T", bound=BaseModel)


def connect_options(settings: Settings, role: str = "client") -> dict[str, Any]:
    """nats-py connect options for a process of `role` (admin, client, stages or one stage).

    An explicit `nats_user`/`nats_password` (or token) wins; otherwise the role's password, when settings
    have one, makes the connection log in as the role's user; with neither, no credentials are sent
    (a NATS server without auth). `servers` lists every URL of `nats_url` (a cluster's nodes): nats-py
    connects to one and reconnects to the others (and to the ones the cluster announces)."""
    opts: dict[str, Any] = {"servers": settings.nats_servers, "name": "codetune"}
    if settings.nats_user:
        opts["user"] = settings.nats_user
        if settings.nats_password:
            opts["password"] = settings.nats_password.get_secret_value()
    elif (password := _role_password(settings, role)) is not None:
        opts["user"] = role
        opts["password"] = password
    if settings.nats_token:
        opts["token"] = settings.nats_token.get_secret_value()
    return opts


def _role_password(settings: Settings, role: str) -> str | None:
    secret = settings.nats_password_for(role)
    return secret.get_secret_value() if secret is not None else None


def uses_roles(settings: Settings) -> bool:
    """True when connections log in as role users (the local stack, or role passwords configured)."""
    return not settings.nats_user and _role_password(settings, "admin") is not None


async def provision_as_admin(settings: Settings, js: JetStreamContext | None = None) -> None:
    """Provision streams and consumers as the admin user when settings have its password; otherwise with
    `js` (or a client connection), which changes nothing that is already as defined."""
    from events.streams import RetryPolicy, provision

    retry = RetryPolicy.from_settings(settings)

    async def once() -> None:
        if js is not None and not uses_roles(settings):
            await provision(js, retry, replicas=settings.nats_replicas)
            return
        async with await CodeTuneClient.connect(settings, source="codetune/provision", role="admin") as admin:
            await provision(admin.js, retry, replicas=settings.nats_replicas)

    await _through_elections(once, settings.nats_replicas > 1)


ELECTION_WAIT_S = 30.0


async def _through_elections(step: Callable[[], Awaitable[None]], clustered: bool) -> None:
    """Run `step`; on a cluster, again while JetStream elects leaders. Just after a node died or came back,
    API calls time out or answer 503 until the meta, stream and consumer leaders are settled (seconds);
    that is waited out for up to ELECTION_WAIT_S, then the error is raised."""
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout
    from nats.js.errors import ServiceUnavailableError

    deadline = asyncio.get_running_loop().time() + ELECTION_WAIT_S
    while True:
        try:
            return await step()
        except (NatsTimeout, NoRespondersError, ServiceUnavailableError):
            if not clustered or asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.5)


class Published(BaseModel):
    id: str
    subject: str
    stream: str | None = None
    seq: int | None = None
    duplicate: bool = False


class CodeTuneClient:
    def __init__(self, nc: NATS, *, source: str = "codetune/client") -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.source = source

    @classmethod
    async def connect(
        cls, settings: Settings, *, source: str = "codetune/client", role: str = "client", **kw: Any
    ) -> CodeTuneClient:
        opts = connect_options(settings, role) | {"connect_timeout": 3, "max_reconnect_attempts": 3} | kw
        return cls(await nats.connect(**opts), source=source)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.nc.drain()

    async def __aenter__(self) -> CodeTuneClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ publish

    async def publish(
        self, payload: BaseModel, *, subject: str | None = None, event_id: str | None = None
    ) -> Published:
        """Publish a payload to JetStream as a binary-mode CloudEvent; the id doubles as Nats-Msg-Id."""
        subject = subject or s.subject_of(payload)
        event_id = event_id or new_event_id()
        headers = ce_headers(subject, event_id, self.source, version=getattr(payload, "v", 1))
        tracing.inject(headers)  # the caller's trace goes on with the event (README "Tracing")
        body = payload.model_dump_json(exclude_none=False).encode()
        ack: PubAck = await self.js.publish(subject, body, headers=headers)
        return Published(id=event_id, subject=subject, stream=ack.stream, seq=ack.seq,
                         duplicate=bool(ack.duplicate))

    async def publish_raw(self, subject: str, body: bytes, headers: dict[str, str] | None = None) -> PubAck:
        """Publish exactly these bytes (what `nats pub` does: no headers unless given)."""
        return await self.js.publish(subject, body, headers=headers)

    # ------------------------------------------------------------------ request-reply

    async def request(self, subject: str, payload: BaseModel | dict[str, Any], timeout: float = 30.0) -> Any:
        """Core-NATS request-reply (ollama.*). Returns `result`; raises CodeTuneError on an error reply."""
        body = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
        headers: dict[str, str] = tracing.inject({})  # empty unless tracing is on
        msg = await self.nc.request(subject, body.encode(), timeout=timeout, headers=headers or None)
        reply = json.loads(msg.data)
        if not reply.get("ok", True):
            err = reply.get("error") or {}
            raise CodeTuneError(err.get("message", "request failed"), code=err.get("code", "error"))
        return reply.get("result")

    # ------------------------------------------------------------------ wait for

    @contextlib.asynccontextmanager
    async def subscribe(
        self,
        subjects: Iterable[str],
        *,
        accept: Callable[[str, Any], bool] | None = None,
        maxsize: int = 0,
        with_ids: bool = False,
    ) -> AsyncIterator[asyncio.Queue[Any]]:
        """Core-NATS subscription to live events (subscribe BEFORE publishing what you wait for).

        Items are `(subject, data)`, or `(subject, data, event id)` with `with_ids`; `accept` filters them;
        a bounded queue (`maxsize`) drops what a slow reader cannot take instead of growing without end.
        """
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=maxsize)

        async def cb(msg: Msg) -> None:
            try:
                data, meta = unwrap(msg.data, dict(msg.headers or {}))
            except CodeTuneError:
                return
            if accept is not None and not accept(msg.subject, data):
                return
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait((msg.subject, data, meta.id) if with_ids else (msg.subject, data))

        subs = [await self.nc.subscribe(subj, cb=cb) for subj in subjects]
        await self.nc.flush()
        try:
            yield queue
        finally:
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def publish_and_wait(
        self,
        payload: BaseModel,
        answers: Iterable[str],
        match: Callable[[str, Any], bool],
        timeout: float = 60.0,
    ) -> tuple[str, BaseModel]:
        """Publish a command and wait for its answer (the first event on `answers` that `match` accepts);
        subscribed before publishing, so a fast answer is never missed. TimeoutError after `timeout`."""
        async with self.subscribe(answers, accept=match) as queue:
            await self.publish(payload)
            return await self.wait_for(queue, match, timeout)

    async def wait_for(
        self,
        queue: asyncio.Queue[tuple[str, Any]],
        match: Callable[[str, Any], bool],
        timeout: float = 60.0,
    ) -> tuple[str, BaseModel]:
        """Wait for the first event on `queue` that `match(subject, data)` accepts; returns it typed."""
        async with asyncio.timeout(timeout):
            while True:
                subject, data = await queue.get()
                if match(subject, data):
                    return subject, s.payload_for(subject).model_validate(data)
