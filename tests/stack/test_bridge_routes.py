"""The original client's remaining routes on the real stack, over real HTTP (the bridge as a subprocess):
the model picker (hub online through a hub stand-in, offline, unreachable), push over `model.push.requested`
(the models stage runs in-process and alone holds the token), assistant chat, settings, `GET /`, `WS /ws`,
`ollama/create`'s Modelfile text / bucket key / refused path, and CORS with real preflight requests."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from devkit.hub_standin import serve_hub
from events import subjects as sj
from events.payloads import ErrorInfo, TuningFailed, TuningProgress
from storage.documents import BaseLLM, ClientSettings, HubPush, TuningJob, UserModel
from tests.conftest import free_port
from tests.stack.test_bridge import AUTH, TOKEN, insert_job, serve_bridge, wait_until

pytestmark = pytest.mark.usefixtures("workers")

HF_TOKEN = "hf_routes_secret_token_42"
DEV_ORIGIN = "http://localhost:5173"


@pytest.fixture(scope="module")
async def bridge_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("routes") / "bridge.log"


@pytest.fixture(scope="module")
async def bridge(env, client, bridge_log: Path) -> AsyncIterator[str]:
    """A bridge with a bearer token (hub offline, as the test stack is)."""
    with serve_bridge(env, bridge_log, {"CODETUNE_BRIDGE_TOKEN": TOKEN}, log_level="info") as url:
        await wait_until(f"{url}/readyz")
        yield url


@pytest.fixture
async def http(bridge: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=bridge, headers=AUTH, timeout=60) as c:
        yield c


@contextlib.asynccontextmanager
async def other_bridge(env: dict[str, str], log: Path, extra: dict[str, str]) -> AsyncIterator[str]:
    with serve_bridge(env, log, extra) as url:
        await wait_until(f"{url}/readyz")
        yield url


def ws_url(base: str, query: str) -> str:
    return base.replace("http://", "ws://") + "/ws?" + query


async def stored_events(client, subject: str) -> list[bytes]:
    """Every message body the events stream holds on `subject`."""
    info = await client.js.stream_info("CODETUNE", subjects_filter=subject)
    if not (info.state.subjects or {}).get(subject):
        return []
    sub = await client.js.subscribe(subject, ordered_consumer=True, deliver_policy="all")
    out = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1)
            except Exception:
                return out
            out.append(msg.data)
    finally:
        await sub.unsubscribe()


# --------------------------------------------------------------------------- GET /


async def test_root_describes_the_service_without_a_token(bridge: str) -> None:
    async with httpx.AsyncClient(base_url=bridge) as c:
        r = await c.get("/")
    body = r.json()
    assert r.status_code == 200 and body["message"] == "CodeTune backend running"
    assert body["docs"] == "/docs" and body["api"] == "/api/v1" and body["version"]


# --------------------------------------------------------------------------- the model picker


async def ready_model(repo_id: str, sha: str = "0" * 40) -> None:
    await BaseLLM.upsert_by({"repo_id": repo_id, "revision": "main"},
                                 {"status": "ready", "sha": sha, "prefix": f"models/{repo_id}/{sha}", "files": 3})


async def test_models_offline_answers_the_pulled_models_and_says_so(http, uid: str) -> None:
    await ready_model(f"routes-test/pulled-{uid}")
    r = await http.get("/api/v1/models/")
    assert r.status_code == 200, r.text
    assert r.headers["x-codetune-hub"] == "offline" and "HF_HUB_OFFLINE" in r.headers["x-codetune-hub-reason"]
    row = next(m for m in r.json() if m["id"] == f"routes-test/pulled-{uid}")
    assert {"id", "downloads", "task", "tags"} <= set(row) and row["task"] == "text-generation"
    assert row["pulled"] is True and row["source"] == "pulled" and row["sha"] == "0" * 40
    async with httpx.AsyncClient(base_url=str(http.base_url)) as anonymous:
        assert (await anonymous.get("/api/v1/models/")).status_code == 401


async def test_models_online_merges_the_hub_search_with_the_pulled_models(env, tmp_path: Path, uid: str) -> None:
    await ready_model("Qwen/Qwen2.5-0.5B-Instruct", sha="a" * 40)
    await ready_model(f"routes-test/local-only-{uid}")
    with serve_hub("unused") as (hub_url, hub):
        extra = {"CODETUNE_BRIDGE_TOKEN": TOKEN, "CODETUNE_HF_OFFLINE": "false", "CODETUNE_HF_ENDPOINT": hub_url}
        async with other_bridge(env, tmp_path / "online.log", extra) as url:
            async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as c:
                r = await c.get("/api/v1/models/")
                again = await c.get("/api/v1/models/")
    assert r.status_code == 200 and r.headers["x-codetune-hub"] == "online", r.text
    rows = {m["id"]: m for m in r.json()}
    hub_rows = [m for m in r.json() if m["source"] == "hub"]
    assert [m["id"] for m in hub_rows] == ["HuggingFaceTB/SmolLM2-135M-Instruct", "Qwen/Qwen2.5-0.5B-Instruct",
                                           "codetune-test/tiny-llama"]  # text-generation only, most downloaded first
    assert rows["HuggingFaceTB/SmolLM2-135M-Instruct"]["downloads"] == 900_000
    assert "llama" in rows["HuggingFaceTB/SmolLM2-135M-Instruct"]["tags"]
    qwen = rows["Qwen/Qwen2.5-0.5B-Instruct"]
    assert qwen["pulled"] is True and qwen["sha"] == "a" * 40 and qwen["source"] == "hub"
    assert rows["HuggingFaceTB/SmolLM2-135M-Instruct"]["pulled"] is False
    assert rows[f"routes-test/local-only-{uid}"]["source"] == "pulled"  # pulled, not in the hub's answer
    assert "openai/whisper-tiny" not in rows
    assert again.json() == r.json() and hub.searches == 1  # the hub's answer is kept for a minute


async def test_models_with_an_unreachable_hub_answer_the_pulled_models(env, tmp_path: Path, uid: str) -> None:
    await ready_model(f"routes-test/pulled-{uid}")
    extra = {"CODETUNE_BRIDGE_TOKEN": TOKEN, "CODETUNE_HF_OFFLINE": "false", "CODETUNE_HUB_TIMEOUT_S": "2",
             "CODETUNE_HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    async with other_bridge(env, tmp_path / "unreachable.log", extra) as url:
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as c:
            r = await c.get("/api/v1/models/")
    assert r.status_code == 200 and r.headers["x-codetune-hub"] == "offline"
    assert "unreachable" in r.headers["x-codetune-hub-reason"] or "did not answer" in r.headers["x-codetune-hub-reason"]
    assert f"routes-test/pulled-{uid}" in [m["id"] for m in r.json()]


# --------------------------------------------------------------------------- push, over model.push.requested


async def exported_job(store, uid: str, **fields: Any) -> TuningJob:
    """A succeeded, exported job whose artifacts are in the bucket (what export leaves behind)."""
    job_id = f"job-push-{uid}"
    adapter = f"jobs/{job_id}/adapter"
    out = f"jobs/{job_id}/export"
    await store.put_bytes(f"{adapter}/adapter_config.json", b'{"r": 8}')
    await store.put_bytes(f"{adapter}/adapter_model.safetensors", b"adapter-weights")
    await store.put_bytes(f"{out}/adapter-f16.gguf", b"GGUF-adapter")
    await store.put_bytes(f"gguf/routes-test/base/{uid}/model-f16.gguf", b"GGUF-base")
    await store.put_bytes(f"{out}/Modelfile", b'FROM model-f16.gguf\nADAPTER adapter-f16.gguf\n'
                                                b'PARAMETER stop "<|im_end|>"\n')
    job = TuningJob(job_id=job_id, base_model="routes-test/base", sha=uid, dataset_id=f"ds-push-{uid}",
                    name=f"push-{uid}", status="succeeded", stage="published", adapter_key=adapter,
                    export={"mode": "adapter", "outtype": "f16"},
                    metrics={"steps": 12, "epochs": 1.0, "tokens": 4096, "first_loss": 6.1, "train_loss": 1.2,
                             "eval_loss": 1.4},
                    artifacts={"model_gguf": f"gguf/routes-test/base/{uid}/model-f16.gguf",
                               "adapter_gguf": f"{out}/adapter-f16.gguf", "modelfile": f"{out}/Modelfile"}, **fields)
    await job.insert()
    return job


async def test_push_without_a_token_is_400_and_names_the_variable(http, store, uid: str) -> None:
    job = await exported_job(store, uid)
    r = await http.post("/api/v1/models/push", json={"local_dir": job.job_id, "repo_name": "me/no-token"})
    assert r.status_code == 400 and "HUGGINGFACE_TOKEN" in r.json()["detail"], r.text


async def test_push_sends_the_jobs_artifacts_to_the_hub_and_never_the_token(
        http, client, settings, store, monkeypatch, bridge_log: Path, uid: str) -> None:
    job = await exported_job(store, uid)
    saved = UserModel(model_id=f"um-push-{uid}", name="pushed", job_id=job.job_id)
    await saved.insert()
    with serve_hub(HF_TOKEN) as (hub_url, hub):
        monkeypatch.setattr(settings, "hf_endpoint", hub_url)  # the in-process models stage's settings
        monkeypatch.setattr(settings, "hf_token", SecretStr(HF_TOKEN))
        r = await http.post("/api/v1/models/push", json={"local_dir": f"jobs/{job.job_id}/",
                                                         "repo_name": f"me/routes-{uid}"})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["status"] == "ok" and answer["repo_id"] == f"me/routes-{uid}" and answer["private"] is True
        files = hub.repos[f"me/routes-{uid}"]["files"]
        assert {"README.md", "Modelfile", "adapter-f16.gguf", "model-f16.gguf", "adapter/adapter_config.json",
                "adapter/adapter_model.safetensors"} <= set(files)
        assert files["model-f16.gguf"] == b"GGUF-base" and hub.repos[f"me/routes-{uid}"]["private"] is True
        card = files["README.md"].decode()
        assert "base_model: routes-test/base" in card and "<|im_end|>" in card and "steps: 12" in card
        assert set(answer["files"]) == set(files)

        # the same job to the same repo again (here via the saved model's id): answered from the record
        commits = len(hub.commits)
        again = await http.post("/api/v1/models/push", json={"local_dir": saved.model_id,
                                                             "repo_name": f"me/routes-{uid}"})
        assert again.status_code == 200 and again.json()["commit_url"] == answer["commit_url"]
        assert len(hub.commits) == commits

        # a repo name without a namespace goes under hf_user (set through the settings route)
        await ClientSettings.find(ClientSettings.key == "default").delete()
        r = await http.post("/api/v1/models/push", json={"local_dir": job.job_id, "repo_name": f"public-{uid}",
                                                         "private": False})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "repo_name"]
        assert "hf_user" in r.json()["detail"][0]["msg"]
        assert (await http.post("/api/v1/settings", json={"hf_user": "routes-user"})).status_code == 200
        r = await http.post("/api/v1/models/push", json={"local_dir": job.job_id, "repo_name": f"public-{uid}",
                                                         "private": False})
        assert r.status_code == 200 and r.json()["repo_id"] == f"routes-user/public-{uid}", r.text
        assert hub.repos[f"routes-user/public-{uid}"]["private"] is False
    record = await HubPush.find_one(HubPush.job_id == job.job_id, HubPush.repo_id == f"me/routes-{uid}")
    assert record.status == "pushed"
    await asyncio.sleep(0.5)
    events = [b.decode() for s in (sj.MODEL_PUSH_REQUESTED, sj.MODEL_PUSHED) for b in await stored_events(client, s)]
    assert any(job.job_id in e for e in events)
    everything = [r.text, json.dumps(answer), record.model_dump_json(), bridge_log.read_text(), *events]
    assert all(HF_TOKEN not in text for text in everything)
    assert all(HF_TOKEN.encode() not in v for v in files.values())


async def test_push_errors(http, store, uid: str) -> None:
    r = await http.post("/api/v1/models/push", json={"local_dir": "job-never-existed", "repo_name": "me/x"})
    assert r.status_code == 404 and "job-never-existed" in r.json()["detail"]
    for bad in ("/etc", "../jobs/x", "jobs/a/b", "C:\\models"):
        r = await http.post("/api/v1/models/push", json={"local_dir": bad, "repo_name": "me/x"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "local_dir"], (bad, r.text)
    running = await insert_job(f"run-{uid}", status="running")
    r = await http.post("/api/v1/models/push", json={"local_dir": running.job_id, "repo_name": "me/x"})
    assert r.status_code == 409 and "no exported artifacts" in r.json()["detail"], r.text
    job = await exported_job(store, uid)
    r = await http.post("/api/v1/models/push", json={"local_dir": job.job_id, "repo_name": "me/../x"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "repo_name"]
    assert (await http.post("/api/v1/models/push", json={"repo_name": "me/x"})).status_code == 422


# --------------------------------------------------------------------------- assistant chat


async def test_assistant_chat_needs_a_model_or_a_configured_default(http, env, tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "hi"}]
    r = await http.post("/api/v1/assistant/chat", json={"messages": messages})
    assert r.status_code == 422 and "CODETUNE_ASSISTANT_MODEL" in r.json()["detail"][0]["msg"]
    r = await http.post("/api/v1/assistant/chat", json={"messages": messages, "model": "no-such-model"})
    assert r.status_code == 404 and "no-such-model" in r.json()["detail"]  # it reached Ollama over ollama.chat
    assert (await http.post("/api/v1/assistant/chat", json={"messages": []})).status_code == 422
    extra = {"CODETUNE_BRIDGE_TOKEN": TOKEN, "CODETUNE_ASSISTANT_MODEL": "configured-default-model"}
    async with other_bridge(env, tmp_path / "assistant.log", extra) as url:
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as c:
            r = await c.post("/api/v1/assistant/chat", json={"messages": messages})
    assert r.status_code == 404 and "configured-default-model" in r.json()["detail"]


# --------------------------------------------------------------------------- settings


async def test_settings_keep_non_secrets_and_refuse_the_token(http, env, tmp_path: Path) -> None:
    r = await http.get("/api/v1/settings")
    assert r.status_code == 200 and r.json()["hf_token_set"] is False
    assert set(r.json()) == {"local_model_dir", "dataset_dir", "hf_user", "hf_token_set"}
    r = await http.post("/api/v1/settings", json={"local_model_dir": "./models", "dataset_dir": "./data",
                                                  "hf_user": "routes-user"})
    assert r.status_code == 200 and r.json() == {"local_model_dir": "./models", "dataset_dir": "./data",
                                                 "hf_user": "routes-user", "hf_token_set": False}
    assert (await http.get("/api/v1/settings")).json() == r.json()
    for token in (HF_TOKEN, 12345, {"nested": HF_TOKEN}):
        r = await http.post("/api/v1/settings", json={"hf_token": token, "hf_user": "someone-else"})
        assert r.status_code == 422 and "HUGGINGFACE_TOKEN" in r.json()["detail"][0]["msg"]
        assert HF_TOKEN not in r.text and "12345" not in r.text
    stored = await ClientSettings.get_pymongo_collection().find_one({"key": "default"})
    assert stored["hf_user"] == "routes-user" and "hf_token" not in stored
    assert (await http.post("/api/v1/settings", json={"hf_user": "bad user"})).status_code == 422
    extra = {"CODETUNE_BRIDGE_TOKEN": TOKEN, "CODETUNE_HF_TOKEN": HF_TOKEN}
    async with other_bridge(env, tmp_path / "token.log", extra) as url:
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as c:
            r = await c.get("/api/v1/settings")
    assert r.json()["hf_token_set"] is True and HF_TOKEN not in r.text


# --------------------------------------------------------------------------- WS /ws


async def test_ws_streams_the_jobs_events_like_the_sse_route(bridge: str, client, uid: str) -> None:
    job = await insert_job(uid, status="running", max_steps=2)
    frames: list[dict[str, Any]] = []
    async with connect(ws_url(bridge, f"clientId=web-1&job_id={job.job_id}"), additional_headers=AUTH) as ws:
        frames.append(json.loads(await ws.recv()))
        assert frames[0]["event"] == "snapshot" and frames[0]["data"]["job_status"] == "running"
        await ws.send("hello")  # the original client's echo frames are ignored
        await client.publish(TuningProgress(job_id="job-someone-else", status="running", step=1, max_steps=9))
        for step in (1, 2):
            await client.publish(TuningProgress(job_id=job.job_id, status="running", step=step, max_steps=2, loss=1.0))
        await client.publish(TuningFailed(job_id=job.job_id, error=ErrorInfo(code="oom", message="out of memory")))
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                frames.append(json.loads(await ws.recv()))
    assert closed.value.rcvd.code == 1000
    assert [f["event"] for f in frames] == ["snapshot", "progress", "progress", "failed"]
    assert [f["data"]["step"] for f in frames[1:3]] == [1, 2] and frames[2]["data"]["progress"] == 1.0
    assert all(f["id"] for f in frames[1:]) and frames[-1]["data"]["error"]["code"] == "oom"


async def close_code(url: str, **kw: Any) -> tuple[int, str]:
    async with connect(url, **kw) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    return closed.value.rcvd.code, closed.value.rcvd.reason


async def test_ws_refusals(bridge: str, uid: str) -> None:
    job = await insert_job(uid, status="running", max_steps=2)
    assert (await close_code(ws_url(bridge, f"job_id={job.job_id}")))[0] == 4401
    bad = {"Authorization": "Bearer wrong"}
    assert (await close_code(ws_url(bridge, f"job_id={job.job_id}"), additional_headers=bad))[0] == 4401
    assert (await close_code(ws_url(bridge, f"job_id={TOKEN}"), additional_headers=AUTH))[0] in (4404, 4400)
    assert (await close_code(ws_url(bridge, "clientId=x"), additional_headers=AUTH))[0] == 4400
    code, reason = await close_code(ws_url(bridge, f"job_id=job-never-{uid}"), additional_headers=AUTH)
    assert code == 4404 and "not found" in reason
    with pytest.raises(InvalidStatus) as refused:  # a page on another site cannot open it (CSWSH)
        async with connect(ws_url(bridge, f"job_id={job.job_id}"), additional_headers=AUTH,
                           origin="https://evil.example"):
            pass
    assert refused.value.response.status_code == 403


# --------------------------------------------------------------------------- ollama/create: never a path


async def test_ollama_create_refuses_local_paths_and_missing_keys(http, store, uid: str) -> None:
    for path in ("/etc/ollama/Modelfile", "~/Modelfile", "./Modelfile", "../Modelfile", "C:\\models\\Modelfile",
                 "file:///etc/Modelfile"):
        r = await http.post("/api/v1/ollama/create", json={"name": "x", "modelfile": path})
        assert r.status_code == 422 and "local filesystem path" in r.json()["detail"][0]["msg"], (path, r.text)
    r = await http.post("/api/v1/ollama/create", json={"name": "x", "modelfile": f"jobs/job-{uid}/export/Modelfile"})
    assert r.status_code == 404 and "no Modelfile in the bucket" in r.json()["detail"]
    await store.put_bytes(f"routes/{uid}/Modelfile", b"\xff\xfe not text")
    r = await http.post("/api/v1/ollama/create", json={"name": "x", "modelfile": f"routes/{uid}/Modelfile"})
    assert r.status_code == 422 and "UTF-8" in r.json()["detail"][0]["msg"]
    r = await http.post("/api/v1/ollama/create", json={"name": "x", "modelfile": "FROM no-such-base-model\n"})
    assert r.status_code in (400, 404, 502) and r.status_code != 422  # text: it went to the ollama stage


# --------------------------------------------------------------------------- CORS


def preflight(origin: str, method: str = "POST") -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "content-type"}


async def test_cors_with_a_token_allows_no_origin_by_default(bridge: str) -> None:
    async with httpx.AsyncClient(base_url=bridge) as c:
        r = await c.options("/api/v1/tuning/", headers=preflight(DEV_ORIGIN))
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
        r = await c.get("/api/v1/tuning/", headers={**AUTH, "Origin": DEV_ORIGIN})
        assert r.status_code == 403 and "CODETUNE_CORS_ORIGINS" in r.json()["detail"]
        assert (await c.get("/api/v1/tuning/", headers={**AUTH, "Origin": bridge})).status_code == 200  # same origin
        assert (await c.get("/api/v1/tuning/", headers=AUTH)).status_code == 200  # no Origin: not a browser


async def test_cors_without_a_token_allows_loopback_origins(env, client, tmp_path: Path) -> None:
    async with other_bridge(env, tmp_path / "cors.log", {}) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            for origin in (DEV_ORIGIN, "http://127.0.0.1:3000", "http://[::1]:8000"):
                r = await c.options("/api/v1/tuning/", headers=preflight(origin))
                assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin, (origin, r.text)
                assert "POST" in r.headers["access-control-allow-methods"]
                assert "content-type" in r.headers["access-control-allow-headers"].lower()
                assert "access-control-allow-credentials" not in r.headers
            r = await c.options("/api/v1/tuning/", headers=preflight("https://evil.example"))
            assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
            r = await c.get("/api/v1/models/", headers={"Origin": DEV_ORIGIN})
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == DEV_ORIGIN
            assert "x-codetune-hub" in r.headers["access-control-expose-headers"].lower()
            before = (await client.js.stream_info("CODETUNE")).state.messages
            r = await c.post("/api/v1/models/pull", json={"repo_id": "evil/model"},
                             headers={"Origin": "https://evil.example"})  # a cross-site "simple" POST
            assert r.status_code == 403
            rebound = {"Host": "evil.example:8080", "Origin": "http://evil.example:8080"}  # DNS rebinding
            r = await c.post("/api/v1/models/pull", json={"repo_id": "evil/model"}, headers=rebound)
            assert r.status_code == 401 and "loopback host" in r.json()["detail"]
            assert (await client.js.stream_info("CODETUNE")).state.messages == before


async def test_cors_with_named_origins(env, tmp_path: Path) -> None:
    extra = {"CODETUNE_BRIDGE_TOKEN": TOKEN, "CODETUNE_CORS_ORIGINS": "https://app.example, https://other.example/"}
    async with other_bridge(env, tmp_path / "named.log", extra) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            r = await c.options("/api/v1/tuning/", headers=preflight("https://other.example", "GET"))
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://other.example"
            r = await c.options("/api/v1/tuning/", headers=preflight(DEV_ORIGIN))
            assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
            r = await c.get("/api/v1/tuning/", headers={**AUTH, "Origin": "https://app.example"})
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
            r = await c.get("/api/v1/tuning/", headers={"Origin": "https://app.example"})
            assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://app.example"
