"""One trace per job (README "Tracing"), on a stack of its own with real processes.

The user's program starts a trace (an in-memory exporter here) and sends its `traceparent` with its two bridge
requests (upload, then `tuning.requested`); the bridge and one worker running every stage trace with
`CODETUNE_TRACING=otlp` into a small OTLP/HTTP collector in this test, which keeps the spans in memory. The job
runs on the tiny model through datasets → intake/tuning (which pulls the base model: models) → export →
serving, and every span of every hop must be in the user's trace, connected, and tagged with the job's id.

A stack of its own: the session's workers (in-process and the tuning worker) trace nothing and would take
some of the messages.
"""

from __future__ import annotations

import asyncio
import gzip
import http.server
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from events import subjects as sj
from events.payloads import DatasetUploaded, ModelPullRequested, TuningProgress, TuningRequested
from tests.conftest import TINY_REPO, WorkerProcess, free_port, settings_from, stack_env
from tests.stack.test_bridge import AUTH, TOKEN, serve_bridge, wait_until

pytestmark = [pytest.mark.slow]

STAGES = ["datasets", "intake", "models", "tuning", "export", "serving"]


class Collector:
    """An OTLP/HTTP trace receiver (`POST /v1/traces`, protobuf) keeping every span it is sent, as dicts."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Condition()

    def receive(self, body: bytes) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        request = ExportTraceServiceRequest.FromString(body)
        for rs in request.resource_spans:
            resource = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    attrs = {a.key: getattr(a.value, a.value.WhichOneof("value") or "string_value")
                             for a in sp.attributes}
                    with self.lock:
                        self.spans.append({"trace": sp.trace_id.hex(), "id": sp.span_id.hex(),
                                           "parent": sp.parent_span_id.hex(), "name": sp.name, "attrs": attrs,
                                           "service": resource.get("service.name"),
                                           "links": [link.trace_id.hex() for link in sp.links]})
        with self.lock:
            self.lock.notify_all()

    def wait_for(self, names: set[str], timeout: float) -> set[str]:
        """Block until spans of all these names arrived (or `timeout`); the names still missing."""
        with self.lock:
            self.lock.wait_for(lambda: names <= {s["name"] for s in self.spans}, timeout)
            return names - {s["name"] for s in self.spans}

    @classmethod
    def serve(cls) -> Iterator[tuple[Collector, str]]:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

        collector = cls()
        ok = ExportTraceServiceResponse().SerializeToString()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                collector.receive(body)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(ok)))
                self.end_headers()
                self.wfile.write(ok)

            def log_message(self, *args: Any) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield collector, f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()


def render(spans: list[dict[str, Any]], root: str) -> str:
    """The trace as an indented tree (what a failure shows, and the README's picture)."""
    children: dict[str, list[dict[str, Any]]] = {}
    for s in spans:
        children.setdefault(s["parent"], []).append(s)
    lines: list[str] = []

    def walk(parent: str, depth: int) -> None:
        for s in children.get(parent, []):
            ids = " ".join(f"{k[9:]}={v}" for k, v in s["attrs"].items() if k.startswith("codetune."))
            lines.append(f"{'  ' * depth}{s['name']}  [{s['service']}] {ids}".rstrip())
            walk(s["id"], depth + 1)

    walk(root, 0)
    return "\n".join(lines)


@pytest.fixture(scope="module")
def collector() -> Iterator[tuple[Collector, str]]:
    yield from Collector.serve()


@pytest.fixture(scope="module")
async def traced(env: dict[str, str], collector: tuple[Collector, str], tmp_path_factory: pytest.TempPathFactory
                 ) -> AsyncIterator[SimpleNamespace]:
    """A stack of its own; one worker running every stage and the bridge, both tracing over OTLP."""
    from events.client import CodeTuneClient
    from infra.stack import LocalStack

    home = tmp_path_factory.mktemp("traced-stack")
    shared = {k: env[k] for k in ("CODETUNE_HF_CACHE_DIR", "CODETUNE_HF_OFFLINE", "CODETUNE_OLLAMA_HOST",
                                  "CODETUNE_LLAMACPP_DIR") if k in env}
    e = stack_env(home) | shared | {
        "CODETUNE_WORK_DIR": str(home / "work"), "CODETUNE_TRACING": "otlp", "CODETUNE_OTLP_ENDPOINT": collector[1],
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # the SDK's batch delay (5 s by default): spans arrive while we wait
        # this test is about traces, not the tiny model's quality: the gate lets its few steps through
        "CODETUNE_GATE_MIN_LOSS_IMPROVEMENT": "0", "CODETUNE_GATE_REQUIRE_STOP": "false",
        "CODETUNE_GATE_REQUIRE_ANSWERS": "false", "CODETUNE_GATE_MIN_AGREE_TOKENS": "0",
        "CODETUNE_EVAL_MAX_ROWS": "2", "CODETUNE_EVAL_MAX_NEW_TOKENS": "4", "CODETUNE_EVAL_AGREE_TOKENS": "1"}
    s = settings_from(e)
    st = LocalStack(s)
    await asyncio.to_thread(st.start, log=lambda _: None)
    worker = None
    try:
        worker = await asyncio.to_thread(WorkerProcess(e, STAGES, home / "worker.log").start)
        with serve_bridge(e, home / "bridge.log", {"CODETUNE_BRIDGE_TOKEN": TOKEN}) as url:
            await wait_until(f"{url}/readyz")
            c = await CodeTuneClient.connect(s, source="codetune/tests", role="admin")
            try:
                yield SimpleNamespace(url=url, client=c, home=home, settings=s)
            finally:
                await c.close()
    finally:
        if worker is not None:
            await asyncio.to_thread(worker.kill9)  # its spans are checked: nothing left to drain
        await asyncio.to_thread(st.stop, log=lambda _: None)


async def test_a_job_from_the_first_bridge_request_to_model_published_is_one_trace(
    traced: SimpleNamespace, collector: tuple[Collector, str], uid: str, tmp_path: Path
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from devkit.tinymodel import toy_dataset

    spans, c = collector[0], traced.client
    mine = InMemorySpanExporter()
    provider = TracerProvider()  # the user's program: not this process's global provider
    provider.add_span_processor(SimpleSpanProcessor(mine))
    job_id = f"ftjob-trace-{uid}"
    data = toy_dataset(tmp_path / "facts.jsonl", "chat", rows=24).read_bytes()
    async with httpx.AsyncClient(base_url=traced.url, headers=AUTH, timeout=60) as http:
        with provider.get_tracer("the user's program").start_as_current_span("fine-tune and serve") as root:
            headers: dict[str, str] = {}
            TraceContextTextMapPropagator().inject(headers)
            async with c.subscribe([sj.DATASET_VALIDATED, sj.DATASET_FAILED]) as q:
                r = await http.post("/api/v1/datasets/upload", files={"file": ("facts.jsonl", data)}, headers=headers)
                assert r.status_code == 200, r.text
                dataset_id = r.json()["dataset_id"]
                subject, _ = await c.wait_for(q, lambda _, d: d.get("dataset_id") == dataset_id, 30)
            assert subject == sj.DATASET_VALIDATED
            job = TuningRequested(job_id=job_id, base_model=TINY_REPO, dataset_id=dataset_id, name=f"traced-{uid}",
                                  hyperparameters={"max_steps": 4, "save_steps": 2, "eval_steps": 2,
                                                   "max_seq_len": 64, "batch_size": 2}, export={})
            ends = [sj.MODEL_PUBLISHED, sj.MODEL_PUBLISH_FAILED, sj.MODEL_EXPORT_FAILED, sj.TUNING_FAILED]
            async with c.subscribe(ends) as q:
                r = await http.post("/events/tuning.requested", content=job.model_dump_json(), headers=headers)
                assert r.status_code == 202, r.text
                subject, end = await c.wait_for(q, lambda _, d: d.get("job_id") == job_id, 180)
            assert subject == sj.MODEL_PUBLISHED, end

    trace_id = format(root.get_span_context().trace_id, "032x")
    assert [s.name for s in mine.get_finished_spans()] == ["fine-tune and serve"]
    wanted = {"POST /api/v1/datasets/upload", "POST /events/{subject}",
              *(f"{subject} process" for subject in (sj.DATASET_UPLOADED, sj.TUNING_REQUESTED, sj.MODEL_PULL_REQUESTED,
                                                     sj.MODEL_PULLED, sj.TUNING_COMPLETED, sj.MODEL_EXPORTED)),
              "training", "checkpoint upload", "evaluation", "export", "ollama create", "model.published publish"}
    await asyncio.to_thread(spans.wait_for, wanted, 20)
    await asyncio.sleep(0.5)  # the spans that end after the last publish (the handlers' own)
    with spans.lock:
        got = list(spans.spans)
    chain = [s for s in got if s["trace"] == trace_id]
    tree = render(chain, format(root.get_span_context().span_id, "016x"))  # README "Tracing" shows one
    assert wanted <= {s["name"] for s in chain}, (sorted(wanted - {s["name"] for s in chain}), tree)
    # every span the stages made is in the user's trace (no hop started a trace of its own) ...
    astray = [(s["service"], s["name"]) for s in got if s["service"] == "codetune-stages" and s["trace"] != trace_id]
    assert not astray, astray
    assert {s["service"] for s in chain} == {"codetune-bridge", "codetune-stages"}
    # ... and the trace is one tree: each span's parent is the user's root span or another span of it
    ids = {s["id"] for s in chain} | {format(root.get_span_context().span_id, "016x")}
    assert not [s["name"] for s in chain if s["parent"] not in ids], render(chain, "")
    # each stage's span names the job (the dataset's and the model's spans name theirs)
    for s in chain:
        if s["name"] in {"tuning.requested process", "tuning.completed process", "model.exported process",
                         "training", "checkpoint upload", "evaluation", "export", "ollama create"}:
            assert s["attrs"].get("codetune.job_id") == job_id, s
    by_name = {s["name"]: s for s in chain}
    assert by_name["dataset.uploaded process"]["attrs"]["codetune.dataset_id"] == dataset_id
    assert by_name["model.pulled process"]["attrs"]["codetune.repo_id"] == TINY_REPO
    assert by_name["checkpoint upload"]["attrs"]["codetune.step"] in (2, 4)
    training = by_name["training"]
    assert by_name["checkpoint upload"]["parent"] == training["id"]  # the recipe's thread carried the context


def user_trace(name: str) -> tuple[Any, Any]:
    """A span of a user's program (its own provider, as in the test above) and its `traceparent` header."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import set_span_in_context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    span = TracerProvider().get_tracer("a user's program").start_span(name)
    headers: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(headers, context=set_span_in_context(span))
    return span, headers


async def test_a_job_that_waited_for_a_dataset_uploaded_in_another_trace_goes_on_in_its_own(
    traced: SimpleNamespace, collector: tuple[Collector, str], uid: str, tmp_path: Path
) -> None:
    from devkit.tinymodel import toy_dataset
    from storage.objects import ObjectStore

    spans, c = collector[0], traced.client
    job_id, dataset_id = f"ftjob-wait-{uid}", f"ds-wait-{uid}"
    subject, _ = await c.publish_and_wait(ModelPullRequested(repo_id=TINY_REPO),
                                          [sj.MODEL_PULLED, sj.MODEL_PULL_FAILED],
                                          lambda _, d: d.get("repo_id") == TINY_REPO, 60)
    assert subject == sj.MODEL_PULLED  # the base model is there: the job waits for its dataset alone
    key = f"datasets/{dataset_id}/facts.jsonl"
    # in the bucket but not announced yet: the job waits for it ("uploaded, not validated yet")
    await ObjectStore(traced.settings).put_bytes(key, toy_dataset(tmp_path / "f.jsonl", "chat", rows=16).read_bytes())
    job_span, job_headers = user_trace("submit a job")
    upload_span, upload_headers = user_trace("someone's upload")
    job = TuningRequested(job_id=job_id, base_model=TINY_REPO, dataset_id=dataset_id,
                          hyperparameters={"max_steps": 2, "save_steps": 2, "eval_steps": 2, "max_seq_len": 64,
                                           "batch_size": 2})
    ends = [sj.TUNING_COMPLETED, sj.TUNING_FAILED]
    async with httpx.AsyncClient(base_url=traced.url, headers=AUTH, timeout=60) as http, \
            c.subscribe([sj.progress_subject(job_id), *ends]) as q:
        r = await http.post("/events/tuning.requested", content=job.model_dump_json(), headers=job_headers)
        assert r.status_code == 202, r.text
        _, waiting = await c.wait_for(q, lambda s, d: s.startswith("tuning.progress") and d["status"] == "waiting", 30)
        assert isinstance(waiting, TuningProgress) and dataset_id in (waiting.message or "")
        upload = DatasetUploaded(dataset_id=dataset_id, key=key, name="facts.jsonl")
        r = await http.post("/events/dataset.uploaded", content=upload.model_dump_json(), headers=upload_headers)
        assert r.status_code == 202, r.text
        subject, end = await c.wait_for(q, lambda s, d: s in ends and d.get("job_id") == job_id, 120)
    assert subject == sj.TUNING_COMPLETED, end
    job_trace, upload_trace = (format(sp.get_span_context().trace_id, "032x") for sp in (job_span, upload_span))
    await asyncio.to_thread(spans.wait_for, {"tuning.completed process"}, 20)
    await asyncio.sleep(0.5)
    with spans.lock:
        got = list(spans.spans)
    mine = [s for s in got if s["attrs"].get("codetune.job_id") == job_id]
    assert {"training", "evaluation", "tuning.requested process"} <= {s["name"] for s in mine}
    assert {s["trace"] for s in mine} == {job_trace}, render(got, "")  # resumed in its own trace, not the upload's
    resumed = next(s for s in mine if s["name"] == "job resumed")
    assert resumed["links"] == [upload_trace]  # ... linked to the validation that woke it
    validated = [s for s in got if s["name"] == "dataset.uploaded process" and s["attrs"].get("codetune.dataset_id")
                 == dataset_id]
    assert [s["trace"] for s in validated] == [upload_trace]


async def test_a_structured_cloudevent_sent_with_no_headers_joins_the_trace_its_traceparent_attribute_names(
    traced: SimpleNamespace, collector: tuple[Collector, str], uid: str
) -> None:
    """What `nats pub dataset.uploaded '{"specversion": "1.0", ..., "traceparent": "00-..."}'` sends (no headers):
    CloudEvents' distributed-tracing extension in structured mode."""
    import json

    from storage.objects import ObjectStore

    spans, c = collector[0], traced.client
    dataset_id = f"ds-ce-{uid}"
    key = f"datasets/{dataset_id}/notes.txt"
    await ObjectStore(traced.settings).put_bytes(key, b"one line\nanother line\n")
    span, headers = user_trace("a publisher that is not ours")
    event = {"specversion": "1.0", "id": f"ce-{uid}", "source": "elsewhere", "type": "io.codetune.dataset.uploaded.v1",
             "traceparent": headers["traceparent"], "data": {"dataset_id": dataset_id, "key": key, "name": "notes.txt"}}
    async with c.subscribe([sj.DATASET_VALIDATED, sj.DATASET_FAILED]) as q:
        await c.publish_raw(sj.DATASET_UPLOADED, json.dumps(event).encode())
        subject, _ = await c.wait_for(q, lambda _, d: d.get("dataset_id") == dataset_id, 30)
    assert subject == sj.DATASET_VALIDATED
    await asyncio.to_thread(spans.wait_for, {"dataset.validated process"}, 10)
    await asyncio.sleep(0.5)
    with spans.lock:
        handled = [s for s in spans.spans if s["name"] == "dataset.uploaded process"
                   and s["attrs"].get("codetune.dataset_id") == dataset_id]
    assert [s["trace"] for s in handled] == [format(span.get_span_context().trace_id, "032x")]
    assert handled[0]["parent"] == format(span.get_span_context().span_id, "016x")
