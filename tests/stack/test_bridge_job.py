"""A real tiny job driven only through the bridge: multipart upload → the seed's tuning route → the SSE stream
relays the tuning stage's progress until `completed` (tiny Llama, real LoRA steps in a worker process)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from events import subjects as sj
from tests.conftest import TINY_REPO
from tests.stack.test_bridge import AUTH, TOKEN, serve_bridge, sse_events, wait_until

pytestmark = [pytest.mark.usefixtures("workers", "tuning_worker"), pytest.mark.slow]


@pytest.fixture(scope="module")
async def http(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[httpx.AsyncClient]:
    log = tmp_path_factory.mktemp("bridge-job") / "bridge.log"
    with serve_bridge(env, log, {"CODETUNE_BRIDGE_TOKEN": TOKEN}) as url:
        await wait_until(f"{url}/readyz")
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as c:
            yield c


async def test_sse_streams_a_real_tiny_jobs_progress(http: httpx.AsyncClient, client, tmp_path: Path) -> None:
    from devkit.tinymodel import toy_dataset

    data = toy_dataset(tmp_path / "facts.jsonl", "chat", rows=48).read_bytes()
    async with client.subscribe([sj.DATASET_VALIDATED, sj.DATASET_FAILED]) as q:
        r = await http.post("/api/v1/datasets/upload", files={"file": ("facts.jsonl", data)})
        dataset_id = r.json()["dataset_id"]
        subject, _ = await client.wait_for(q, lambda _, d: d.get("dataset_id") == dataset_id, 30)
    assert subject == sj.DATASET_VALIDATED

    params = {"repo_id": TINY_REPO, "name": "bridge-tiny", "trainingSteps": 12, "learningRate": 1e-2,
              "batch_size": 4, "eval_steps": 4, "save_steps": 6, "max_seq_len": 128, "lora_r": 8}
    r = await http.post("/api/v1/tuning/", json={"dataset_id": dataset_id, "parameters": params})
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]

    events = []
    async with http.stream("GET", f"/api/v1/tuning/{job_id}/events", timeout=240) as stream:
        async for event in sse_events(stream.aiter_lines()):
            events.append(event)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "snapshot" and kinds[-1] == "completed", json.dumps(events)[-2000:]
    steps = [e["data"]["step"] for e in events if e["event"] == "progress" and e["data"]["status"] == "running"]
    assert steps and steps == sorted(steps) and steps[-1] == 12
    assert events[-1]["data"]["metrics"]["steps"] == 12
    progress = (await http.get(f"/api/v1/tuning/{job_id}/progress")).json()
    assert progress["progress"] == 1.0 and progress["job_status"] == "succeeded"
