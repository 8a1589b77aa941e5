"""The webhook bridge on the real stack: `python -m handlers.bridge` as a subprocess on a free loopback port,
driven with a real HTTP client (httpx). Events are checked on NATS, documents in MongoDB, files in S3.

The Ollama routes go through the real ollama stage (the `workers` fixture) to the Ollama stand-in.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from events import subjects as sj
from events.payloads import ErrorInfo, TuningFailed, TuningProgress
from handlers.bridge.signatures import sign_github, sign_standard
from storage.documents import TuningJob, UserModel
from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.usefixtures("workers")

TOKEN = "bridge-test-token"
SECRET = "whsec_" + base64.b64encode(b"codetune-bridge-test-secret-0123").decode()
MAX_BYTES = 64 * 1024
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# --------------------------------------------------------------------------- fixtures and helpers


@contextlib.contextmanager
def serve_bridge(env: dict[str, str], log: Path, extra: dict[str, str] | None = None,
                 log_level: str = "warning") -> Iterator[str]:
    port = free_port()
    mine = {k: v for k, v in os.environ.items() if not k.startswith("CODETUNE_")}  # not the developer's own
    penv = {**mine, **env, "CODETUNE_BRIDGE_PORT": str(port), **(extra or {})}
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "handlers.bridge", "--log-level", log_level], env=penv,
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_until(url: str, status: int = 200, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5) as c:
        while True:
            with contextlib.suppress(httpx.TransportError):
                if (await c.get(url)).status_code == status:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer {status} in {timeout}s")
            await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
async def bridge(env, client, tmp_path_factory) -> AsyncIterator[str]:
    log = tmp_path_factory.mktemp("bridge") / "bridge.log"
    extra = {"CODETUNE_BRIDGE_TOKEN": TOKEN, "CODETUNE_WEBHOOK_SECRET": SECRET,
             "CODETUNE_WEBHOOK_MAX_BYTES": str(MAX_BYTES)}
    with serve_bridge(env, log, extra) as url:
        await wait_until(f"{url}/readyz")
        yield url


@pytest.fixture
async def http(bridge: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=bridge, headers=AUTH, timeout=30) as c:
        yield c


PUBLISHABLE = (sj.DATASET_UPLOADED, sj.MODEL_PULL_REQUESTED, sj.TUNING_REQUESTED, sj.TUNING_CANCEL_REQUESTED)


async def published(client) -> dict[str, int]:
    """Messages stored per publishable subject (the stages react to events, so not the stream's last seq)."""
    counts = {}
    for subject in PUBLISHABLE:
        info = await client.js.stream_info("CODETUNE", subjects_filter=subject)
        counts[subject] = (info.state.subjects or {}).get(subject, 0)
    return counts


def standard(body: bytes, msg_id: str | None = None, ts: int | None = None, secret: str = SECRET) -> dict[str, str]:
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    ts = int(time.time()) if ts is None else ts
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts),
            "webhook-signature": sign_standard(secret, msg_id, ts, body), "content-type": "application/json"}


def github(body: bytes, delivery: str | None = None, secret: str = SECRET) -> dict[str, str]:
    h = {"X-Hub-Signature-256": sign_github(secret, body), "content-type": "application/json"}
    if delivery:
        h["X-GitHub-Delivery"] = delivery
    return h


def cancel_body(job_id: str | None = None) -> bytes:
    return json.dumps({"job_id": job_id or f"job-{uuid.uuid4().hex[:12]}"}).encode()


async def sse_events(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    event: dict[str, Any] = {}
    async for line in lines:
        if not line:
            if "data" in event:
                event["data"] = json.loads(event["data"])
                yield event
            event = {}
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            event[field] = value.removeprefix(" ")


async def insert_job(uid: str, **fields: Any) -> TuningJob:
    job = TuningJob(job_id=f"job-{uid}", base_model="codetune-demo/tiny-llama", dataset_id=f"ds-bridge-{uid}",
                    hyperparameters={"epochs": 1, "max_steps": 20, "learning_rate": 1e-4, "batch_size": 2},
                    export={"mode": "adapter", "outtype": "q8_0", "quantize": None}, name="tiny-tuned", **fields)
    await job.insert()
    return job


# --------------------------------------------------------------------------- health, auth, docs


async def test_liveness_and_readiness_need_no_token(bridge: str) -> None:
    async with httpx.AsyncClient(base_url=bridge) as c:
        for path in ("/api/v1/health/pulse", "/healthz"):
            r = await c.get(path)
            assert r.status_code == 200 and r.json()["status"] == "ok"
        for path in ("/api/v1/health/status", "/readyz"):
            r = await c.get(path)
            body = r.json()
            assert r.status_code == 200 and body["status"] == "ok", body
            assert all(body[dep]["ok"] and body[dep]["latency_ms"] is not None for dep in ("nats", "mongodb", "s3"))


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/api/v1/datasets/"), ("POST", "/api/v1/datasets/upload"), ("POST", "/api/v1/models/pull"),
    ("GET", "/api/v1/tuning/"), ("GET", "/api/v1/tuning/job-abc/events"), ("GET", "/api/v1/ollama/models"),
    ("GET", "/api/v1/user-models/"), ("DELETE", "/api/v1/user-models/um-x"),
])
async def test_api_routes_need_the_bearer_token(bridge: str, client, method: str, path: str) -> None:
    before = await published(client)
    async with httpx.AsyncClient(base_url=bridge) as c:
        r = await c.request(method, path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert "missing bearer token" in r.json()["detail"]
        r = await c.request(method, path, headers={"Authorization": "Bearer wrong-token"})
        assert r.status_code == 401 and r.json() == {"detail": "invalid bearer token"}
    assert await published(client) == before


async def test_openapi_and_asyncapi_pages_without_try_it_out(bridge: str) -> None:
    from handlers.bridge.asyncapi import SPEC_PATH

    async with httpx.AsyncClient(base_url=bridge) as c:
        paths = (await c.get("/openapi.json")).json()["paths"]
        assert {"/events/{subject}", "/api/v1/datasets/upload", "/api/v1/tuning/{job_id}/events"} <= set(paths)
        assert "multipart/form-data" in paths["/api/v1/datasets/upload"]["post"]["requestBody"]["content"]
        assert (await c.get("/docs")).status_code == 200
        assert (await c.get("/asyncapi.json")).json() == json.loads(SPEC_PATH.read_text())
        page = (await c.get("/asyncapi")).text
        assert "<asyncapi-viewer" in page and "try" not in page.lower()
        assert (await c.post("/asyncapi/try", json={})).status_code in (404, 405)


async def test_docs_pages_load_everything_from_the_bridge_itself(bridge: str) -> None:
    """/docs and /asyncapi work offline: every script, stylesheet and document they reference is served
    by the bridge (from installed packages), none comes from a CDN."""
    async with httpx.AsyncClient(base_url=bridge) as c:
        for page, needs in (("/docs", ("swagger-ui-bundle.js", "swagger-ui.css", "/openapi.json")),
                            ("/asyncapi", ("asyncapi-viewer.js", "asyncapi-theme.css", "/asyncapi.json"))):
            r = await c.get(page)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), page
            refs = re.findall(r"""(?:src|href)=["']([^"']+)["']""", r.text) + re.findall(r"url: '([^']+)'", r.text)
            assert all(any(ref.endswith(n) for ref in refs) for n in needs), (page, refs)
            assert not [ref for ref in refs if "//" in ref], f"{page} loads from outside: {refs}"
            for ref in refs:
                asset = await c.get(ref)
                assert asset.status_code == 200 and asset.content, (page, ref, asset.status_code)
                if ref.endswith(".js"):  # a module script must come with a JavaScript MIME type
                    assert "javascript" in asset.headers["content-type"], (ref, asset.headers["content-type"])
        assert (await c.get("/redoc")).status_code == 404  # FastAPI's CDN-only ReDoc page is not served


def test_asyncapi_document_matches_the_code() -> None:
    # In a subprocess: build_app() re-includes the stages' module-level routers into a new broker, which
    # must not happen in this process while the `workers` app runs them.
    out = subprocess.run([sys.executable, "-m", "handlers.bridge.asyncapi", "--check"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_bridge_process_never_imports_torch() -> None:
    code = ("import sys, time; t = time.perf_counter(); from handlers.bridge.app import create_app; "
            "from core.settings import Settings; create_app(Settings(_env_file=None)); "
            "bad = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; "
            "assert not bad, bad; print(round(time.perf_counter() - t, 3))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) < 3.0  # ~0.7 s on an idle 2-core machine, ~1.4 s with load 3.5


def test_refuses_to_serve_beyond_loopback_without_a_token(env: dict[str, str]) -> None:
    penv = {**{k: v for k, v in os.environ.items() if not k.startswith("CODETUNE_")}, **env}
    out = subprocess.run([sys.executable, "-m", "handlers.bridge", "--host", "0.0.0.0", "--port", "1"],
                         env=penv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "refusing to serve" in out.stderr


async def test_readiness_reports_each_dependency_separately(env: dict[str, str], tmp_path: Path) -> None:
    down = {"CODETUNE_MONGODB_URI": f"mongodb://127.0.0.1:{free_port()}/?directConnection=true",
            "CODETUNE_S3_ENDPOINT": f"127.0.0.1:{free_port()}"}
    with serve_bridge(env, tmp_path / "down.log", down) as url:
        await wait_until(f"{url}/api/v1/health/pulse")
        await wait_until(f"{url}/readyz", status=503)
        async with httpx.AsyncClient(base_url=url, timeout=10) as c:
            body = (await c.get("/api/v1/health/status")).json()
            assert body["status"] == "unavailable" and body["nats"]["ok"] is True
            assert body["mongodb"]["ok"] is False and body["mongodb"]["error"]
            assert body["s3"]["ok"] is False and body["s3"]["error"]
            r = await c.get("/api/v1/tuning/")  # loopback, no token configured: open, but MongoDB is down
            assert r.status_code == 503 and r.json()["detail"].startswith("MongoDB is not ready")


# --------------------------------------------------------------------------- datasets


async def test_upload_streams_to_the_bucket_and_the_datasets_stage_validates_it(http, client, store) -> None:
    lines = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]})
             for i in range(50)]
    data = ("\n".join(lines) + "\n").encode()
    async with client.subscribe([sj.DATASET_VALIDATED, sj.DATASET_FAILED]) as q:
        r = await http.post("/api/v1/datasets/upload", files={"file": ("my chat.jsonl", data)},
                            data={"format": "chat", "name": "my-chat"})
        assert r.status_code == 200, r.text
        up = r.json()
        assert up["dataset_id"].startswith("ds-") and up["size"] == len(data) and up["format"] == "chat"
        subject, answer = await client.wait_for(q, lambda _, d: d.get("dataset_id") == up["dataset_id"], 30)
    assert subject == sj.DATASET_VALIDATED and answer.profile.rows == 50
    assert await store.get_bytes(up["key"]) == data
    rows = (await http.get("/api/v1/datasets/")).json()
    row = next(x for x in rows if x["dataset_id"] == up["dataset_id"])
    assert row["path"] == up["key"] and row["size"] == len(data) and row["status"] == "validated"
    assert row["name"] == "my-chat" and row["rows"] == 50


async def test_the_same_bytes_uploaded_again_are_the_same_dataset_not_a_copy(http, client, store, uid) -> None:
    data = "".join(f"line {i} of {uid}\n" for i in range(20)).encode()
    async with client.subscribe([sj.DATASET_VALIDATED, sj.DATASET_FAILED]) as q:
        r = await http.post("/api/v1/datasets/upload", files={"file": ("first.txt", data)}, data={"format": "text"})
        first = r.json()
        await client.wait_for(q, lambda _, d: d.get("dataset_id") == first["dataset_id"], 30)
    assert first["reused"] is False and len(first["sha256"]) == 64
    before = await published(client)
    r = await http.post("/api/v1/datasets/upload", files={"file": ("again.txt", data)}, data={"format": "text"})
    again = r.json()
    assert r.status_code == 200 and again["reused"] is True and again["status"] == "validated"
    assert again["dataset_id"] == first["dataset_id"] and again["key"] == first["key"]
    assert again["name"] == "first.txt" and again["aliases"] == ["again.txt"] and again["sha256"] == first["sha256"]
    assert await published(client) == before  # validated already: nothing announced again
    assert [k for k, _ in await store.list("datasets/") if k.endswith("again.txt")] == []  # no second copy
    rows = [x for x in (await http.get("/api/v1/datasets/")).json() if x["dataset_id"] == first["dataset_id"]]
    assert len(rows) == 1
    # another requested format is another validation of the same bytes: another dataset
    r = await http.post("/api/v1/datasets/upload", files={"file": ("first.txt", data)}, data={"format": "auto"})
    assert r.json()["reused"] is False and r.json()["dataset_id"] != first["dataset_id"]

    # the same new bytes uploaded twice at the same moment end as one dataset, one object
    twin = f"twin {uid}\n".encode() * 5
    a, b = await asyncio.gather(*(http.post("/api/v1/datasets/upload", files={"file": (f"{n}.txt", twin)},
                                            data={"format": "text"}) for n in ("a", "b")))
    assert a.json()["dataset_id"] == b.json()["dataset_id"] and {a.json()["reused"], b.json()["reused"]} == {
        False, True}
    kept = [k for k, _ in await store.list("datasets/") if k.rsplit("/", 1)[-1] in ("a.txt", "b.txt")
            and await store.get_bytes(k) == twin]
    assert kept == [a.json()["key"]]


async def test_upload_errors(http, client, store) -> None:
    before = await published(client)
    r = await http.post("/api/v1/datasets/upload", data={"format": "chat"}, files={"other": ("x.txt", b"hi\n")})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "file"]
    r = await http.post("/api/v1/datasets/upload", content=b"{}", headers={"content-type": "application/json"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
    r = await http.post("/api/v1/datasets/upload", files={"file": ("x.txt", b"hi\n")}, data={"format": "csv"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "format"]
    assert await published(client) == before


# --------------------------------------------------------------------------- models and tuning


async def test_model_pull_publishes_the_command(http, client) -> None:
    async with client.subscribe([sj.MODEL_PULL_REQUESTED]) as q:
        r = await http.post("/api/v1/models/pull", json={"repo_id": "bridge-test/tiny", "local_dir": "./models/x"})
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "ok" and r.json()["local_dir"] == "bridge-test/tiny"
        _, event = await client.wait_for(q, lambda _, d: d.get("repo_id") == "bridge-test/tiny", 10)
    assert event.revision == "main"
    r = await http.post("/api/v1/models/pull", json={"repo_id": "../etc"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "repo_id"]


async def test_tuning_request_maps_the_seed_parameters(http, client) -> None:
    params = {"repo_id": "codetune-demo/tiny-llama", "name": "my-tuned", "epochs": 2, "trainingSteps": 30,
              "learningRate": 1e-4, "quantization": "int4", "push": True, "batch_size": 2, "color": "blue"}
    async with client.subscribe([sj.TUNING_REQUESTED]) as q:
        r = await http.post("/api/v1/tuning/", json={"dataset_id": "ds-bridge-map", "parameters": params})
        assert r.status_code == 200, r.text
        job_id = r.json()["id"]
        assert r.json()["ignored"] == ["color", "push"]
        _, event = await client.wait_for(q, lambda _, d: d.get("job_id") == job_id, 10)
    hp = event.hyperparameters
    assert (hp.epochs, hp.max_steps, hp.learning_rate, hp.batch_size) == (2, 30, 1e-4, 2)
    assert event.base_model == "codetune-demo/tiny-llama" and event.name == "my-tuned"
    assert event.dataset_id == "ds-bridge-map"
    assert (event.export.outtype, event.export.quantize) == ("f16", "q4_K_M")


@pytest.mark.parametrize(("params", "loc"), [
    ({"repo_id": "a/b", "learningRate": 5}, ["body", "parameters", "learningRate"]),
    ({"learningRate": 1e-4}, ["body", "parameters", "repo_id"]),
    ({"repo_id": "a/b", "quantization": "int3"}, ["body", "parameters", "quantization"]),
    ({"repo_id": "a/b", "name": "Has Spaces"}, ["body", "parameters", "name"]),
    ({"repo_id": "a/b", "trainingSteps": 0}, ["body", "parameters", "trainingSteps"]),
])
async def test_tuning_request_errors_name_the_seed_field(http, client, params: dict, loc: list) -> None:
    before = await published(client)
    r = await http.post("/api/v1/tuning/", json={"dataset_id": "ds-bridge-x", "parameters": params})
    assert r.status_code == 422, r.text
    assert loc in [e["loc"] for e in r.json()["detail"]]
    assert await published(client) == before


async def test_tuning_job_views(http, uid: str) -> None:
    job = await insert_job(uid, status="running", step=5, max_steps=20, loss=1.25, eta_s=30.0)
    r = await http.get(f"/api/v1/tuning/{job.job_id}")
    body = r.json()
    assert r.status_code == 200 and body["id"] == job.job_id and body["dataset_id"] == job.dataset_id
    assert body["status"] == "training" and body["job_status"] == "running" and body["progress"] == 0.25
    assert body["parameters"]["repo_id"] == job.base_model and body["parameters"]["quantization"] == "int8"
    assert body["parameters"]["trainingSteps"] == 20 and body["result"] is None
    p = (await http.get(f"/api/v1/tuning/{job.job_id}/progress")).json()
    assert p["task_id"] == job.job_id and p["progress"] == 0.25 and p["status"] == "training" and p["loss"] == 1.25
    assert job.job_id in [j["id"] for j in (await http.get("/api/v1/tuning/")).json()]
    r = await http.get("/api/v1/tuning/job-unknown-x")
    assert r.status_code == 404 and "not found" in r.json()["detail"]
    assert (await http.get("/api/v1/tuning/bad%20id")).status_code == 422


async def test_cancel_publishes_the_command(http, client, uid: str) -> None:
    async with client.subscribe([sj.TUNING_CANCEL_REQUESTED]) as q:
        r = await http.post(f"/api/v1/tuning/job-{uid}/cancel")
        assert r.status_code == 202 and r.json()["status"] == "ok"
        await client.wait_for(q, lambda _, d: d.get("job_id") == f"job-{uid}", 10)


async def test_sse_relays_the_jobs_progress_until_its_terminal_event(http, client, uid: str) -> None:
    job = await insert_job(uid, status="running", max_steps=3)
    seen: list[dict[str, Any]] = []
    async with http.stream("GET", f"/api/v1/tuning/{job.job_id}/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        async for event in sse_events(r.aiter_lines()):
            seen.append(event)
            if event["event"] == "snapshot":  # subscribed: now the job makes progress
                await client.publish(TuningProgress(job_id="job-someone-else", status="running", step=1, max_steps=9))
                for step in (1, 2, 3):
                    await client.publish(TuningProgress(job_id=job.job_id, status="running", step=step, max_steps=3,
                                                        loss=2.0 / step))
                await client.publish(TuningFailed(job_id="job-someone-else", error=ErrorInfo(code="x", message="x")))
                oom = ErrorInfo(code="oom", message="out of memory")
                await client.publish(TuningFailed(job_id=job.job_id, error=oom))
    assert [e["event"] for e in seen] == ["snapshot", "progress", "progress", "progress", "failed"]
    assert seen[0]["data"]["job_status"] == "running"
    assert [e["data"]["step"] for e in seen[1:4]] == [1, 2, 3] and seen[3]["data"]["progress"] == 1.0
    assert all(e.get("id") for e in seen[1:])
    assert seen[-1]["data"]["error"]["code"] == "oom"


async def test_sse_of_a_finished_job_ends_after_its_snapshot(http, uid: str) -> None:
    job = await insert_job(uid, status="succeeded", stage="published", step=20, max_steps=20)
    async with http.stream("GET", f"/api/v1/tuning/{job.job_id}/events") as r:
        events = [e async for e in sse_events(r.aiter_lines())]
    assert [e["event"] for e in events] == ["snapshot"] and events[0]["data"]["status"] == "completed"


# --------------------------------------------------------------------------- user models


async def test_user_models_crud_and_import(http, client, uid: str) -> None:
    params = {"repo_id": "codetune-demo/tiny-llama", "name": "saved-one", "epochs": 3, "learningRate": 2e-4,
              "quantization": "int8"}
    r = await http.post("/api/v1/user-models/", json={"name": "My model", "dataset_id": f"ds-bridge-{uid}",
                                                      "parameters": params, "result": {"loss": 0.5}})
    assert r.status_code == 200, r.text
    saved = r.json()
    assert saved["name"] == "My model" and saved["parameters"] == params and saved["id"].startswith("um-")
    assert saved["id"] in [m["id"] for m in (await http.get("/api/v1/user-models/")).json()]

    r = await http.post(f"/api/v1/user-models/{saved['id']}/rename", json={"name": "Renamed"})
    assert r.status_code == 200 and r.json()["name"] == "Renamed"
    assert (await UserModel.find_one(UserModel.model_id == saved["id"])).name == "Renamed"

    async with client.subscribe([sj.TUNING_REQUESTED]) as q:
        r = await http.post(f"/api/v1/user-models/import/{saved['id']}")
        assert r.status_code == 200, r.text
        tuning = r.json()
        assert tuning["status"] == "queued" and tuning["dataset_id"] == f"ds-bridge-{uid}"
        _, event = await client.wait_for(q, lambda _, d: d.get("job_id") == tuning["id"], 10)
    assert event.hyperparameters.epochs == 3 and event.hyperparameters.learning_rate == 2e-4
    assert event.export.outtype == "q8_0" and event.name == "saved-one"

    assert (await http.delete(f"/api/v1/user-models/{saved['id']}")).json() == {"status": "ok"}
    for method, path in (("DELETE", f"/api/v1/user-models/{saved['id']}"),
                         ("POST", f"/api/v1/user-models/import/{saved['id']}")):
        r = await http.request(method, path)
        assert r.status_code == 404 and "not found" in r.json()["detail"]
    r = await http.post("/api/v1/user-models/um-nope/rename", json={"name": "x"})
    assert r.status_code == 404


async def test_save_a_model_from_a_job(http, uid: str) -> None:
    job = await insert_job(uid, status="succeeded", stage="published", metrics={"train_loss": 0.4})
    r = await http.post("/api/v1/user-models/", json={"name": "from job", "job_id": job.job_id})
    saved = r.json()
    assert saved["dataset_id"] == job.dataset_id and saved["base_model"] == job.base_model
    assert saved["local_path"] == f"jobs/{job.job_id}" and saved["result"]["metrics"] == {"train_loss": 0.4}
    assert saved["parameters"]["quantization"] == "int8"


# --------------------------------------------------------------------------- ollama (the ollama stage)


async def test_ollama_routes_through_the_ollama_stage(http, ollama_host: str) -> None:
    """Bridge → `ollama.*` request-reply → the ollama stage (`workers`) → the Ollama stand-in (or OLLAMA_HOST)."""
    import ollama

    names = [m.model for m in (await ollama.AsyncClient(host=ollama_host).list()).models]
    r = await http.get("/api/v1/ollama/models")
    assert r.status_code == 200 and r.json() == names
    messages = [{"role": "user", "content": "Capital of France?"}]
    r = await http.post("/api/v1/ollama/chat", json={"model": "no-such-model:latest", "messages": messages})
    assert r.status_code == 404 and "not found" in r.json()["detail"]
    r = await http.post("/api/v1/ollama/pull", json={"model": "no-such-model:latest"})
    assert r.status_code in (400, 404, 502) and isinstance(r.json()["detail"], str)
    r = await http.post("/api/v1/ollama/chat", json={"model": "x", "messages": []})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "messages"]
    r = await http.post("/api/v1/ollama/create", json={"name": "x", "modelfile": "FROM no-such-base"})
    assert r.status_code in (400, 404) and "no-such-base" in r.json()["detail"]
    r = await http.post("/api/v1/ollama/create", json={"name": "x", "modelfile": "BOGUS line\nFROM y"})
    assert r.status_code == 400 and "unknown instruction 'BOGUS'" in r.json()["detail"]
    r = await http.post("/api/v1/ollama/create", json={"name": "x", "modelfile": "FROM a.gguf",
                                                       "gguf_path": "datasets/../../etc"})
    assert r.status_code == 400 and "unsafe" in r.json()["detail"]


# --------------------------------------------------------------------------- webhooks


async def test_standard_webhook_publishes_with_its_id_as_msg_id(bridge: str, client, store, uid: str) -> None:
    key = f"datasets/ds-bridge-{uid}/hook.txt"
    await store.put_bytes(key, b"one line\nanother line\n")
    body = json.dumps({"dataset_id": f"ds-bridge-{uid}", "key": key, "name": "hook.txt"}).encode()
    headers = standard(body, msg_id=f"msg_{uid}")
    async with httpx.AsyncClient(base_url=bridge) as c, client.subscribe([sj.DATASET_VALIDATED]) as q:
        r = await c.post("/events/dataset.uploaded", content=body, headers=headers)
        assert r.status_code == 202, r.text
        assert r.json()["id"] == f"msg_{uid}" and r.json()["subject"] == "dataset.uploaded"
        _, answer = await client.wait_for(q, lambda _, d: d.get("dataset_id") == f"ds-bridge-{uid}", 30)
    assert answer.profile.rows == 2
    msg = await client.js.get_msg("CODETUNE", r.json()["seq"])
    assert msg.headers["Nats-Msg-Id"] == f"msg_{uid}" and msg.headers["ce-id"] == f"msg_{uid}"


async def test_github_signature_and_cloudevents(bridge: str, client, uid: str) -> None:
    async with httpx.AsyncClient(base_url=bridge) as c:
        body = cancel_body(f"job-{uid}")
        r = await c.post("/events/tuning.cancel.requested", content=body, headers=github(body, f"gh-{uid}"))
        assert r.status_code == 202 and r.json()["id"] == f"gh-{uid}"

        structured = json.dumps({"specversion": "1.0", "id": f"ce-{uid}", "source": "/tests", "type": "x.cancel",
                                 "data": {"job_id": f"job-{uid}"}}).encode()
        headers = {**github(structured), "content-type": "application/cloudevents+json"}
        r = await c.post("/events/tuning.cancel.requested", content=structured, headers=headers)
        assert r.status_code == 202 and r.json()["id"] == f"ce-{uid}"

        binary = {**github(body), "ce-specversion": "1.0", "ce-id": f"bin-{uid}", "ce-source": "/tests",
                  "ce-type": "x.cancel"}
        r = await c.post("/events/tuning.cancel.requested", content=body, headers=binary)
        assert r.status_code == 202 and r.json()["id"] == f"bin-{uid}"
        msg = await client.js.get_msg("CODETUNE", r.json()["seq"])
        assert json.loads(msg.data) == {"v": 1, "job_id": f"job-{uid}"}


async def test_signature_failures_are_401_and_publish_nothing(bridge: str, client) -> None:
    body = cancel_body()
    cases = {
        "missing": {"content-type": "application/json"},
        "bearer instead of signature": {**AUTH, "content-type": "application/json"},
        "wrong secret": standard(body, secret="whsec_" + base64.b64encode(b"another-secret").decode()),
        "tampered body": standard(cancel_body()),
        "expired": standard(body, ts=int(time.time()) - 3600),
        "from the future": standard(body, ts=int(time.time()) + 3600),
        "github wrong secret": github(body, secret="nope"),
        "incomplete standard": {k: v for k, v in standard(body).items() if k != "webhook-timestamp"},
    }
    before = await published(client)
    async with httpx.AsyncClient(base_url=bridge) as c:
        for name, headers in cases.items():
            r = await c.post("/events/tuning.cancel.requested", content=body, headers=headers)
            assert r.status_code == 401, (name, r.text)
            assert isinstance(r.json()["detail"], str)
    assert await published(client) == before


async def test_a_replay_gets_the_first_answer_and_publishes_nothing(bridge: str, client, uid: str) -> None:
    body = cancel_body(f"job-{uid}")
    async with httpx.AsyncClient(base_url=bridge) as c:
        before = await published(client)
        first = await c.post("/events/tuning.cancel.requested", content=body, headers=standard(body, f"msg_r{uid}"))
        assert first.status_code == 202 and "idempotent-replayed" not in first.headers
        await asyncio.sleep(1.1)  # a sender's retry: new timestamp, new signature, same id
        again = await c.post("/events/tuning.cancel.requested", content=body, headers=standard(body, f"msg_r{uid}"))
        assert again.status_code == 202 and again.json() == first.json()
        assert again.headers["idempotent-replayed"] == "true"
        assert await published(client) == before | {sj.TUNING_CANCEL_REQUESTED: before[sj.TUNING_CANCEL_REQUESTED] + 1}

        other = cancel_body()
        r = await c.post("/events/tuning.cancel.requested", content=other, headers=standard(other, f"msg_r{uid}"))
        assert r.status_code == 422 and "different request" in r.json()["detail"]

        gh = {**github(body), "Idempotency-Key": f"idem-{uid}"}
        one, two = [await c.post("/events/tuning.cancel.requested", content=body, headers=gh) for _ in range(2)]
        assert one.json() == two.json() and one.json()["id"] == f"idem-{uid}"
        assert two.headers["idempotent-replayed"] == "true"
    assert await published(client) == before | {sj.TUNING_CANCEL_REQUESTED: before[sj.TUNING_CANCEL_REQUESTED] + 2}


async def test_concurrent_duplicates_publish_once(bridge: str, client, uid: str) -> None:
    body = cancel_body(f"job-{uid}")
    before = await published(client)
    async with httpx.AsyncClient(base_url=bridge) as c:
        answers = await asyncio.gather(*(
            c.post("/events/tuning.cancel.requested", content=body, headers=standard(body, f"msg_c{uid}"))
            for _ in range(6)))
    assert {r.status_code for r in answers} <= {202, 409}
    assert len({r.text for r in answers if r.status_code == 202}) == 1  # first answer, or the same replayed
    assert all(r.headers["retry-after"] == "1" for r in answers if r.status_code == 409)
    assert await published(client) == before | {sj.TUNING_CANCEL_REQUESTED: before[sj.TUNING_CANCEL_REQUESTED] + 1}


async def test_receipts_take_over_an_abandoned_reservation(client, uid: str) -> None:
    from handlers.bridge.receipts import STALE_S, IdempotencyConflict, Receipt, Receipts

    receipts = await Receipts.open(client.js)
    key, fp = f"crashed-{uid}", "fp"
    k = "r." + hashlib.sha256(key.encode()).hexdigest()
    await receipts.kv.create(k, Receipt(state="pending", fingerprint=fp, at=time.time()).model_dump_json().encode())

    async def produce() -> tuple[int, dict[str, Any]]:
        return 202, {"id": key}

    with pytest.raises(IdempotencyConflict) as e:  # a live reservation: 409
        await receipts.once(key, fp, produce)
    assert e.value.status == 409
    stale = Receipt(state="pending", fingerprint=fp, at=time.time() - STALE_S - 1).model_dump_json().encode()
    await receipts.kv.put(k, stale)  # its bridge died between reserve and publish
    assert await receipts.once(key, fp, produce) == (202, {"id": key}, False)
    assert await receipts.once(key, fp, produce) == (202, {"id": key}, True)


async def test_oversized_webhooks_are_413_while_reading(bridge: str, client) -> None:
    big = json.dumps({"job_id": "job-big", "pad": "x" * MAX_BYTES}).encode()
    before = await published(client)

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit applies as the body streams in
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    async with httpx.AsyncClient(base_url=bridge) as c:
        r = await c.post("/events/tuning.cancel.requested", content=big, headers=standard(big))
        assert r.status_code == 413 and "byte limit" in r.json()["detail"]
        r = await c.post("/events/tuning.cancel.requested", content=chunks(), headers=standard(big))
        assert r.status_code == 413 and "byte limit" in r.json()["detail"]
        r = await c.post("/api/v1/tuning/", content=chunks(), headers={**AUTH, "content-type": "application/json"})
        assert r.status_code == 413 and "byte limit" in r.json()["detail"]
    assert await published(client) == before


async def test_bad_payloads_are_422_with_field_errors(bridge: str, client) -> None:
    cases = [
        ("tuning.requested", {"base_model": "a/b", "dataset_id": "ds-x", "hyperparameters": {"learning_rate": 5}},
         ["body", "hyperparameters", "learning_rate"]),
        ("tuning.requested", {"base_model": "a/b", "dataset_id": "ds-x", "learning_rte": 1},
         ["body", "learning_rte"]),
        ("model.pull.requested", {"revision": "main"}, ["body", "repo_id"]),
        ("tuning.cancel.requested", [1, 2], ["body"]),
    ]
    before = await published(client)
    async with httpx.AsyncClient(base_url=bridge) as c:
        for subject, payload, loc in cases:
            body = json.dumps(payload).encode()
            r = await c.post(f"/events/{subject}", content=body, headers=standard(body))
            assert r.status_code == 422 and loc in [e["loc"] for e in r.json()["detail"]], (subject, r.text)
        structured = json.dumps({"specversion": "1.0", "id": "ce-bad", "source": "/t", "type": "t",
                                 "data": {"nope": 1}}).encode()
        r = await c.post("/events/tuning.cancel.requested", content=structured,
                         headers={**github(structured), "content-type": "application/cloudevents+json"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "data", "job_id"]
        body = b"{not json"
        r = await c.post("/events/tuning.cancel.requested", content=body, headers=standard(body))
        assert r.status_code == 422 and "invalid JSON" in r.json()["detail"][0]["msg"]
        body = cancel_body()
        r = await c.post("/events/tuning.completed", content=body, headers=standard(body))
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["path", "subject"]
    assert await published(client) == before


# --------------------------------------------------------------------------- trust: secrets, CloudEvents, SSE, tokens


def test_a_bad_webhook_secret_refuses_to_start(env: dict[str, str]) -> None:
    penv = {**{k: v for k, v in os.environ.items() if not k.startswith("CODETUNE_")}, **env,
            "CODETUNE_WEBHOOK_SECRET": "whsec_bad*secret!", "CODETUNE_BRIDGE_PORT": str(free_port())}
    out = subprocess.run([sys.executable, "-m", "handlers.bridge"], env=penv, cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0 and "CODETUNE_WEBHOOK_SECRET" in out.stderr and "refusing to start" in out.stderr
    assert "bad*secret" not in out.stderr and "Traceback" not in out.stderr


async def test_an_unpadded_whsec_secret_verifies_signed_requests(env, client, tmp_path: Path, uid: str) -> None:
    padded = "whsec_" + base64.b64encode(b"codetune-key-1234").decode()
    assert padded.endswith("=")
    with serve_bridge(env, tmp_path / "unpadded.log", {"CODETUNE_WEBHOOK_SECRET": padded.rstrip("=")}) as url:
        await wait_until(f"{url}/readyz")
        body = cancel_body(f"job-{uid}")
        async with httpx.AsyncClient(base_url=url) as c:
            r = await c.post("/events/tuning.cancel.requested", content=body, headers=standard(body, secret=padded))
    assert r.status_code == 202, r.text


async def test_cloudevents_need_their_required_attributes_and_a_valid_encoding(bridge: str, client) -> None:
    data = {"job_id": "job-ce-bad"}
    good = {"specversion": "1.0", "id": "ce-x", "source": "/t", "type": "t"}
    structured = {
        "no id": ({k: v for k, v in good.items() if k != "id"} | {"data": data}, "id"),
        "no source": ({k: v for k, v in good.items() if k != "source"} | {"data": data}, "source"),
        "no type": ({k: v for k, v in good.items() if k != "type"} | {"data": data}, "type"),
        "specversion 0.3": (good | {"specversion": "0.3", "data": data}, "specversion"),
        "data_base64 not base64": (good | {"data_base64": "%%% not base64 %%%"}, "data_base64"),
        "data_base64 a number": (good | {"data_base64": 5}, "data_base64"),
    }
    body = json.dumps(data).encode()
    ce = {"ce-specversion": "1.0", "ce-id": "bin-x", "ce-source": "/t", "ce-type": "t"}
    binary = {
        "no ce-id": {k: v for k, v in ce.items() if k != "ce-id"},
        "no ce-source": {k: v for k, v in ce.items() if k != "ce-source"},
        "no ce-type": {k: v for k, v in ce.items() if k != "ce-type"},
        "ce-specversion 0.3": ce | {"ce-specversion": "0.3"},
    }
    before = await published(client)
    async with httpx.AsyncClient(base_url=bridge) as c:
        for name, (event, attribute) in structured.items():
            raw = json.dumps(event).encode()
            r = await c.post("/events/tuning.cancel.requested", content=raw,
                             headers={**github(raw), "content-type": "application/cloudevents+json"})
            assert r.status_code == 422, (name, r.text)
            assert attribute in r.json()["detail"][0]["msg"], (name, r.text)
        for name, headers in binary.items():
            r = await c.post("/events/tuning.cancel.requested", content=body, headers={**github(body), **headers})
            assert r.status_code == 422, (name, r.text)
            assert "ce-" in r.json()["detail"][0]["msg"], (name, r.text)
    assert await published(client) == before


async def test_sse_for_an_unknown_job_is_404(http) -> None:
    started = time.monotonic()
    r = await http.get(f"/api/v1/tuning/job-never-{uuid.uuid4().hex[:8]}/events")
    assert r.status_code == 404 and "not found" in r.json()["detail"]
    assert time.monotonic() - started < 15


async def test_tokens_only_in_the_header_and_query_strings_never_logged(env, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    with serve_bridge(env, log, {"CODETUNE_BRIDGE_TOKEN": TOKEN}, log_level="info") as url:
        await wait_until(f"{url}/readyz")
        async with httpx.AsyncClient(base_url=url) as c:
            for query in (f"token={TOKEN}", f"access_token={TOKEN}"):
                r = await c.get(f"/api/v1/tuning/?{query}")
                assert r.status_code == 401, r.text
            r = await c.get("/api/v1/tuning/?limit=1", headers=AUTH)
            assert r.status_code == 200
        await asyncio.sleep(0.5)
    text = log.read_text()
    assert "GET /api/v1/tuning/ HTTP/1.1" in text  # the access log is on: paths, without queries
    assert TOKEN not in text and "limit=1" not in text
