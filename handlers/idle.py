"""Scale to zero: a worker that exits after a quiet period (`codetune worker --exit-when-idle SECONDS`).

Idle means no message in flight and none received for SECONDS. Then the worker drains and exits 0:
the messages it is handling finish and are acked (or nak'ed for redelivery) by their own handlers, a
message that still arrives while it stops is nak'ed at once so another worker takes it, and nothing it
held is left waiting for `ack_wait`. A supervisor (KEDA, systemd, a shell loop) starts a new worker when
the stage's durable consumer has lag again: the message waits in JetStream until then.

The tracker is a broker middleware, so it sees every message of every subscriber of the process (the
durable pull consumers and the core `ollama.*` request subscribers alike); it publishes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from faststream import BaseMiddleware, FastStream

log = logging.getLogger("codetune")

_JS_ACK_PREFIX = "$JS.ACK."


class IdleTracker:
    """Counts messages in flight and remembers when the last one arrived."""

    def __init__(self, idle_s: float) -> None:
        if idle_s <= 0:
            raise ValueError("the idle period must be positive")
        self.idle_s = idle_s
        self.in_flight = 0
        self.handled = 0
        self.last_activity = time.monotonic()
        self.draining = False

    def idle_for(self) -> float:
        """Seconds without a message, or 0 while one is in flight."""
        return 0.0 if self.in_flight else time.monotonic() - self.last_activity

    def middleware(self, msg: Any, /, *, context: Any) -> BaseMiddleware:
        return _Tracked(msg, context=context, tracker=self)

    async def watch(self, app: FastStream, poll_s: float | None = None) -> None:
        """Ask `app` to stop once the worker has been idle for `idle_s` (the app then drains and exits)."""
        poll = poll_s or min(0.5, self.idle_s / 4)
        self.last_activity = time.monotonic()  # the quiet period counts from "ready", not process start
        while True:
            quiet = self.idle_for()
            if quiet >= self.idle_s:
                break
            # nothing can end the quiet period early, so sleep until it could be over (or poll while busy)
            await asyncio.sleep(max(poll, self.idle_s - quiet) if quiet else poll)
        self.draining = True
        log.info("idle for %.1fs with nothing in flight (%d message(s) handled): exiting", self.idle_s, self.handled)
        app.exit()


class _Tracked(BaseMiddleware):
    __slots__ = ("tracker",)

    def __init__(self, msg: Any, /, *, context: Any, tracker: IdleTracker) -> None:
        super().__init__(msg, context=context)
        self.tracker = tracker

    async def on_receive(self) -> None:
        self.tracker.in_flight += 1
        self.tracker.last_activity = time.monotonic()

    async def after_processed(self, exc_type: Any = None, exc_val: Any = None, exc_tb: Any = None) -> bool | None:
        self.tracker.in_flight -= 1
        self.tracker.handled += 1
        self.tracker.last_activity = time.monotonic()
        return False

    async def consume_scope(self, call_next: Any, msg: Any) -> Any:
        reply = getattr(msg.raw_message, "reply", "") or ""
        if self.tracker.draining and reply.startswith(_JS_ACK_PREFIX):
            # fetched while stopping: hand it back now instead of holding it until ack_wait
            with contextlib.suppress(Exception):
                await msg.nack()
            log.info("stopping: %s handed back for redelivery", msg.raw_message.subject)
            return None
        return await call_next(msg)
