"""The serving stage's request-reply subscribers in FastStream's TestNatsBroker: every request gets an
answer, and a bad one names what is wrong. Fast handler units; the real round trips over NATS are in
tests/stack (test_bridge_routes, test_real_model)."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from faststream.nats import NatsBroker, TestNatsBroker

from core.settings import Settings
from events import subjects as sj


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens on it once the socket is closed


@pytest.fixture
async def serving() -> AsyncIterator[NatsBroker]:
    from handlers.serving.router import requests

    broker = NatsBroker()
    broker.include_router(requests)
    # Ollama is down: nothing listens on this port
    settings = Settings(_env_file=None, ollama_host=f"http://127.0.0.1:{_closed_port()}")
    broker.context.set_global("settings", settings)
    async with TestNatsBroker(broker) as br:
        yield br


async def ask(broker: NatsBroker, subject: str, body: bytes) -> dict[str, Any]:
    reply = await broker.request(body, subject, timeout=10)
    answer = json.loads(reply.body)
    assert isinstance(answer, dict)
    return answer


@pytest.mark.parametrize(("body", "says"), [
    (b"{not json", "invalid json"),
    (b'{"model": "tiny", "mesages": []}', "mesages"),  # a typo is named, not ignored
    (b'{"model": "", "messages": [{"role": "user", "content": "hi"}]}', "model"),
])
async def test_a_bad_chat_request_is_answered_with_a_reason(serving: NatsBroker, body: bytes, says: str) -> None:
    answer = await ask(serving, sj.OLLAMA_CHAT, body)
    assert answer["ok"] is False
    assert answer["error"]["code"] == "invalid_payload", answer
    assert says in answer["error"]["message"].lower(), answer


async def test_a_valid_request_while_ollama_is_down_is_answered_not_dropped(serving: NatsBroker) -> None:
    answer = await ask(serving, sj.OLLAMA_MODELS, b"{}")  # what `nats req ollama.models '{}'` sends
    assert answer["ok"] is False
    assert answer["error"]["code"] == "ollama_unavailable", answer
    assert "unreachable" in answer["error"]["message"], answer
