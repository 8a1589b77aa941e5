"""Metrics units (README "Metrics"): bounded subject labels, FastStream's middleware with them, a worker's
/metrics server on a free port, the bridge's latency by route template. The scrape after a real pipeline
run is tests/stack/test_metrics_stack.py."""

from __future__ import annotations

import httpx
from fastapi import FastAPI
from faststream import FastStream
from faststream.nats import NatsBroker, TestNatsBroker
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from core.settings import Settings
from handlers.bridge.metrics import RequestLatency
from handlers.metrics import BRIDGE_REQUEST_SECONDS, MessageMetrics, WorkerMetrics, subject_label


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == name}


def test_subjects_are_labelled_by_their_contract_name() -> None:
    assert subject_label("tuning.requested") == "tuning.requested"
    assert subject_label("tuning.progress.ftjob-0123abcd") == "tuning.progress.<job_id>"
    assert subject_label("dlq.tuning.progress.ftjob-1") == "dlq.tuning.progress.<job_id>"
    assert subject_label("dlq.dataset.uploaded") == "dlq.dataset.uploaded"
    assert subject_label("anything.else") == subject_label("_INBOX.abc") == "other"


async def test_message_metrics_keep_one_series_for_every_jobs_progress() -> None:
    from prometheus_client import generate_latest

    registry = CollectorRegistry()
    broker = NatsBroker(middlewares=[MessageMetrics(registry=registry, app_name="codetune-test")])
    seen: list[str] = []

    @broker.subscriber("tuning.progress.*")
    async def progress(body: dict) -> None:
        seen.append(body["job_id"])

    async with TestNatsBroker(broker) as br:
        for job in ("ftjob-a", "ftjob-b", "ftjob-c"):
            await br.publish({"job_id": job}, f"tuning.progress.{job}")
    assert seen == ["ftjob-a", "ftjob-b", "ftjob-c"]
    text = generate_latest(registry).decode()
    received = samples(text, "faststream_received_messages_total")
    assert received == {(("app_name", "codetune-test"), ("broker", "nats"),
                         ("handler", "tuning.progress.<job_id>")): 3.0}
    published = samples(text, "faststream_published_messages_total")
    assert list(published.values()) == [3.0] and "ftjob" not in text


async def test_a_worker_serves_its_registry_on_a_free_port_and_stops() -> None:
    settings = Settings(_env_file=None, metrics_port=0)
    app = FastStream(NatsBroker())
    metrics = WorkerMetrics(settings, "codetune-test").install(app, app.broker)  # type: ignore[arg-type]
    assert app.context.get("metrics") is metrics and metrics.middleware in app.broker.middlewares
    await metrics.start()
    try:
        assert metrics.url and metrics.url.startswith("http://127.0.0.1:") and not metrics.url.endswith(":0/metrics")
        async with httpx.AsyncClient() as c:
            r = await c.get(metrics.url)
        assert r.status_code == 200
        names = {f.name for f in text_string_to_metric_families(r.text)}
        assert {"codetune_training_step_seconds", "codetune_dead_letters", "codetune_export_seconds",
                "codetune_checkpoint_upload_seconds", "codetune_training_tokens"} <= names
    finally:
        await metrics.stop()
    async with httpx.AsyncClient() as c:
        try:
            await c.get(metrics.url)
            raise AssertionError("the metrics server still answers after stop")
        except httpx.TransportError:
            pass


async def test_off_by_default_no_middleware_and_no_server() -> None:
    broker = NatsBroker()
    app = FastStream(broker)
    metrics = WorkerMetrics(Settings(_env_file=None), "codetune-test").install(app, broker)
    assert Settings(_env_file=None).metrics_port is None
    assert metrics.middleware not in broker.middlewares
    await metrics.start()
    assert metrics.server is None and metrics.url is None


async def test_bridge_latency_is_labelled_by_route_template_not_path() -> None:
    api = FastAPI()

    @api.get("/api/v1/things/{thing_id}")
    async def thing(thing_id: str) -> dict[str, str]:
        return {"id": thing_id}

    api.add_middleware(RequestLatency)

    registry = CollectorRegistry()
    registry.register(BRIDGE_REQUEST_SECONDS)

    def count(route: str, status: str) -> float:
        labels = {"method": "GET", "route": route, "status": status}
        return registry.get_sample_value("codetune_bridge_request_duration_seconds_count", labels) or 0.0

    before = count("/api/v1/things/{thing_id}", "200"), count("unmatched", "404")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://t") as c:
        for i in range(3):
            assert (await c.get(f"/api/v1/things/{i}")).status_code == 200
        assert (await c.get("/no/such/path/42")).status_code == 404
    assert count("/api/v1/things/{thing_id}", "200") - before[0] == 3
    assert count("unmatched", "404") - before[1] == 1
