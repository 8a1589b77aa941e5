"""Prometheus metrics after a real pipeline run (README "Metrics"): the in-process light stages, the tuning
worker process and a bridge process are scraped over HTTP before and after one tiny job (bridge upload →
tuning → export → serving) and one malformed message, and the counters that must move have moved."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from events import subjects as sj
from events.payloads import TuningRequested
from tests.conftest import TINY_REPO
from tests.stack.test_bridge import AUTH, TOKEN, serve_bridge, wait_until

pytestmark = [pytest.mark.usefixtures("workers", "tuning_worker"), pytest.mark.slow]
END = [sj.MODEL_PUBLISHED, sj.MODEL_PUBLISH_FAILED, sj.MODEL_EXPORT_FAILED, sj.TUNING_FAILED]
STEPS = 8


class Scrape:
    """One /metrics page, parsed by prometheus_client's own text parser."""

    def __init__(self, text: str) -> None:
        self.samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples named `name` whose labels include `labels` (0 when there are none)."""
        return sum(s.value for s in self.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def labels(self, name: str, label: str) -> set[str]:
        return {s.labels[label] for s in self.samples if s.name == name and label in s.labels}


async def scrape(url: str, timeout: float = 30.0) -> Scrape:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=10) as c:
        while True:
            try:
                r = await c.get(url)
                r.raise_for_status()
                assert r.headers["content-type"].startswith("text/plain")
                return Scrape(r.text)
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
async def bridge(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    log = tmp_path_factory.mktemp("bridge-metrics") / "bridge.log"
    with serve_bridge(env, log, {"CODETUNE_BRIDGE_TOKEN": TOKEN}) as url:
        await wait_until(f"{url}/readyz")
        yield url


async def test_metrics_move_after_a_pipeline_run_and_a_dead_letter(bridge: str, workers, tuning_worker, client,
                                                                    tmp_path: Path) -> None:
    from devkit.tinymodel import toy_dataset

    light_url = workers.context.get("metrics").url
    assert light_url is not None, "the in-process stages serve no /metrics"
    before_light, before_tuning, before_bridge = await asyncio.gather(
        scrape(light_url), scrape(tuning_worker.metrics_url), scrape(f"{bridge}/metrics"))

    # a job through the pipeline: the dataset uploaded through the bridge, the rest on the bus
    # bytes of its own: an upload identical to another test's is that dataset, validated once (no new event)
    data = toy_dataset(tmp_path / "facts.jsonl", "chat", rows=32, seed=random.randrange(1 << 30)).read_bytes()
    async with httpx.AsyncClient(base_url=bridge, headers=AUTH, timeout=60) as http:
        async with client.subscribe([sj.DATASET_VALIDATED, sj.DATASET_FAILED]) as q:
            r = await http.post("/api/v1/datasets/upload", files={"file": ("facts.jsonl", data)})
            assert r.status_code == 200, r.text
            dataset_id = r.json()["dataset_id"]
            subject, _ = await client.wait_for(q, lambda _, d: d.get("dataset_id") == dataset_id, 30)
        assert subject == sj.DATASET_VALIDATED
        assert (await http.get(f"/api/v1/tuning/ftjob-{uuid.uuid4().hex[:12]}")).status_code == 404
    job_id = f"ftjob-{uuid.uuid4().hex[:12]}"
    req = TuningRequested(job_id=job_id, base_model=TINY_REPO, dataset_id=dataset_id, name=f"metrics-{job_id[6:]}",
                          hyperparameters={"max_steps": STEPS, "learning_rate": 3e-2, "eval_steps": 4,
                                           "save_steps": 4, "max_seq_len": 128},
                          export={"gate": False})  # timed whatever the gate says; published either way
    async with client.subscribe(END) as q:
        await client.publish(req)
        subject, end = await client.wait_for(q, lambda _, d: d.get("job_id") == job_id, 240)
    assert subject == sj.MODEL_PUBLISHED, end

    # a malformed message: dead-lettered once by the datasets stage
    async with client.subscribe([sj.dead_letter_subject(sj.DATASET_UPLOADED)]) as q:
        await client.js.publish(sj.DATASET_UPLOADED, b"{not json")
        await client.wait_for(q, lambda _, d: d.get("body") == "{not json", 30)

    light, tuning, front = await asyncio.gather(
        scrape(light_url), scrape(tuning_worker.metrics_url), scrape(f"{bridge}/metrics"))

    def moved(after: Scrape, before: Scrape, name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    # FastStream's message metrics: what each stage consumed and how it ended, what it published
    processed = "faststream_received_processed_messages_total"
    assert moved(tuning, before_tuning, processed, app_name="codetune-tuning", handler=sj.TUNING_REQUESTED,
                 status="acked") >= 1
    for handler in (sj.DATASET_UPLOADED, sj.TUNING_REQUESTED, sj.TUNING_COMPLETED, sj.MODEL_EXPORTED):
        assert moved(light, before_light, processed, app_name="codetune-stages", handler=handler, status="acked") >= 1
    assert moved(light, before_light, processed, handler=sj.DATASET_UPLOADED, status="rejected") == 1
    published = "faststream_published_messages_total"
    assert moved(tuning, before_tuning, published, destination="tuning.progress.<job_id>", status="success") >= 2
    assert not any(job_id in d for d in tuning.labels(published, "destination"))  # one series, not one per job
    assert moved(light, before_light, published, destination=sj.MODEL_PUBLISHED, status="success") >= 1

    # the product's own
    # (at least: a job of an earlier test may still be training on the shared tuning worker)
    assert moved(tuning, before_tuning, "codetune_training_step_seconds_count") >= STEPS
    assert moved(tuning, before_tuning, "codetune_training_step_seconds_sum") > 0
    assert moved(tuning, before_tuning, "codetune_training_tokens_total") > 0
    assert tuning.value("codetune_training_tokens_per_second") > 0
    assert moved(tuning, before_tuning, "codetune_checkpoint_upload_seconds_count") >= STEPS // 4
    assert moved(light, before_light, "codetune_export_seconds_count", mode="adapter", outcome="exported") == 1
    assert moved(light, before_light, "codetune_export_seconds_sum", outcome="exported") > 0
    assert moved(light, before_light, "codetune_dead_letters_total", subject=sj.DATASET_UPLOADED) == 1

    # the bridge: latency by route template and status, jobs by status from MongoDB
    latency = "codetune_bridge_request_duration_seconds_count"
    assert moved(front, before_bridge, latency, method="POST", route="/api/v1/datasets/upload", status="200") == 1
    assert moved(front, before_bridge, latency, method="GET", route="/api/v1/tuning/{job_id}", status="404") == 1
    assert moved(front, before_bridge, latency, route="/metrics", status="200") == 1  # the scrape before
    assert moved(front, before_bridge, "codetune_jobs", status="succeeded") >= 1
    assert front.labels("codetune_jobs", "status") >= {"queued", "running", "succeeded", "failed"}
