"""The ollama stage's request-reply subscribers in FastStream's TestNatsBroker: every request gets an
answer, and a bad one names what is wrong. Fast handler units; the real round trips over NATS are in
tests/stack (test_bridge_routes, test_real_model).

The broker runs in its own interpreter: including the stage's module-level router in a test broker
rebinds its subscribers to that broker, which must not happen in the process whose `workers` fixture
(tests/stack) runs them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from events import subjects as sj
from tests.conftest import ROOT

BAD_CHATS = [
    (b"{not json", "invalid json"),
    (b'{"model": "tiny", "mesages": []}', "mesages"),  # a typo is named, not ignored
    (b'{"model": "", "messages": [{"role": "user", "content": "hi"}]}', "model"),
]
ASKS = [(sj.OLLAMA_CHAT, body) for body, _ in BAD_CHATS] + [(sj.OLLAMA_MODELS, b"{}")]  # `nats req ollama.models '{}'`

SCRIPT = r'''
import asyncio, json, socket, sys

from faststream.nats import NatsBroker, TestNatsBroker

from core.settings import Settings
from handlers.ollama.router import router as requests


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens on it once the socket is closed


async def main() -> None:
    broker = NatsBroker()
    broker.include_router(requests)
    # Ollama is down: nothing listens on this port
    broker.context.set_global("settings", Settings(_env_file=None, ollama_host=f"http://127.0.0.1:{closed_port()}"))
    answers = []
    async with TestNatsBroker(broker) as br:
        for subject, body in json.loads(sys.argv[1]):
            reply = await br.request(body.encode(), subject, timeout=10)
            answers.append(json.loads(reply.body))
    print(json.dumps(answers))


asyncio.run(main())
'''


@pytest.fixture(scope="module")
def answers() -> list[dict[str, Any]]:
    asks = json.dumps([(subject, body.decode()) for subject, body in ASKS])
    run = subprocess.run([sys.executable, "-c", SCRIPT, asks], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return list(json.loads(run.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize(("index", "says"), [(i, says) for i, (_, says) in enumerate(BAD_CHATS)])
def test_a_bad_chat_request_is_answered_with_a_reason(answers: list[dict[str, Any]], index: int, says: str) -> None:
    answer = answers[index]
    assert answer["ok"] is False
    assert answer["error"]["code"] == "invalid_payload", answer
    assert says in answer["error"]["message"].lower(), answer


def test_a_valid_request_while_ollama_is_down_is_answered_not_dropped(answers: list[dict[str, Any]]) -> None:
    answer = answers[len(BAD_CHATS)]
    assert answer["ok"] is False
    assert answer["error"]["code"] == "ollama_unavailable", answer
    assert "unreachable" in answer["error"]["message"], answer
