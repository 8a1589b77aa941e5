"""Publishing and chatting through Ollama's HTTP API with the official `ollama` client.

Runs against a REAL Ollama when `OLLAMA_HOST` names one (the stand-in is then not started), otherwise
against `devkit.ollama_standin` (a stand-in, not Ollama) answering with real llama.cpp inference over the
tiny model's GGUF + LoRA adapter. Tests marked `standin_only` check stand-in specifics and are skipped
against a real Ollama.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import pytest
from artifacts import TinyArtifacts, tiny_artifacts  # tests/artifacts.py

from handlers import ollama_ops as ops
from handlers.ollama_format.chat_format import ollama_template
from handlers.ollama_format.gotemplate import GoTemplate

pytestmark = pytest.mark.slow

REAL_OLLAMA = os.environ.get("OLLAMA_HOST")
standin_only = pytest.mark.skipif(bool(REAL_OLLAMA), reason="checks the stand-in itself")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "seed": 7, "num_predict": 12}


@pytest.fixture(scope="module")
def ollama_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Ollama (`OLLAMA_HOST`) or the stand-in serving from a temporary folder."""
    if REAL_OLLAMA:
        host = REAL_OLLAMA if "://" in REAL_OLLAMA else f"http://{REAL_OLLAMA}"
        yield host
        return
    pytest.importorskip("xllamacpp")
    from devkit.ollama_standin import serve_in_thread

    with serve_in_thread(tmp_path_factory.mktemp("ollama-standin")) as url:
        yield url


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyArtifacts:
    pytest.importorskip("torch")
    return tiny_artifacts(tmp_path_factory.getbasetemp() / "tiny-export")


@pytest.fixture(scope="module")
def names(ollama_host: str, tiny: TinyArtifacts) -> Iterator[dict[str, str]]:
    """Three models: base + adapter, merged, base alone (unique names; deleted afterwards)."""
    import asyncio

    suffix = uuid.uuid4().hex[:8]
    created = {"adapter": f"codetune-test-lora-{suffix}", "merged": f"codetune-test-merged-{suffix}",
               "base": f"codetune-test-base-{suffix}"}
    template, stop = ollama_template(tiny.base_dir)

    async def publish() -> None:
        client = ops.make_client(ollama_host)
        await ops.create_model(client, created["adapter"], tiny.base_gguf, tiny.adapter_gguf, template, stop,
                               None, None)
        await ops.create_model(client, created["merged"], tiny.merged_gguf, None, template, stop, None, None)
        await ops.create_model(client, created["base"], tiny.base_gguf, None, template, stop, None, None)

    async def cleanup() -> None:
        client = ops.make_client(ollama_host)
        for name in created.values():
            try:
                await ops.delete_model(client, name)
            except ops.OllamaModelNotFoundError:
                pass

    asyncio.run(publish())
    yield created
    asyncio.run(cleanup())


async def test_published_models_are_listed_and_shown(ollama_host: str, names: dict[str, str],
                                                     tiny: TinyArtifacts) -> None:
    client = ops.make_client(ollama_host)
    listed = {m["model"] for m in await ops.list_models(client)}
    assert {f"{n}:latest" for n in names.values()} <= listed
    shown = await ops.show_model(client, names["adapter"])
    template, stop = ollama_template(tiny.base_dir)
    assert shown["template"] == template
    for s in stop:
        assert f'"{s}"' in shown["parameters"]
    assert shown["details"]["format"] == "gguf"


async def test_chat_answers_with_the_adapter(ollama_host: str, names: dict[str, str]) -> None:
    client = ops.make_client(ollama_host)
    with_adapter = (await ops.chat(client, names["adapter"], QUESTION, GREEDY)).message.content
    merged = (await ops.chat(client, names["merged"], QUESTION, GREEDY)).message.content
    base = (await ops.chat(client, names["base"], QUESTION, GREEDY)).message.content
    assert with_adapter  # the tiny model is random, but it does say something
    assert with_adapter == merged
    assert with_adapter != base


async def test_stream_equals_non_stream_and_options_are_honoured(ollama_host: str, names: dict[str, str]) -> None:
    client = ops.make_client(ollama_host)
    whole = (await ops.chat(client, names["adapter"], QUESTION, GREEDY)).message.content
    pieces = [p async for p in ops.chat_stream(client, names["adapter"], QUESTION, GREEDY)]
    assert len(pieces) > 1 and "".join(pieces) == whole
    raw = await client.chat(model=names["adapter"], messages=QUESTION, options={**GREEDY, "num_predict": 5})
    assert raw.done and raw.done_reason == "length" and raw.eval_count == 5
    # a stop string taken from the greedy reply itself (ASCII: byte-fallback pieces render as U+FFFD)
    at = next(i for i in range(1, len(whole) - 1) if whole[i:i + 2].isascii() and whole[i:i + 2].isalnum())
    stop = whole[at:at + 2]
    stopped = (await ops.chat(client, names["adapter"], QUESTION, {**GREEDY, "stop": [stop]})).message.content
    assert stopped == whole[:whole.index(stop)]


async def test_blob_digest_mismatch_is_rejected(ollama_host: str) -> None:
    body = b"not what the digest says"
    wrong = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    async with httpx.AsyncClient(base_url=ollama_host) as http:
        r = await http.post(f"/api/blobs/{wrong}", content=body)
        assert r.status_code == 400
        assert "digest mismatch" in r.json()["error"]
        right = "sha256:" + hashlib.sha256(body).hexdigest()
        assert (await http.head(f"/api/blobs/{right}")).status_code == 404


async def test_create_with_an_unknown_blob_names_it(ollama_host: str) -> None:
    client = ops.make_client(ollama_host)
    missing = hashlib.sha256(uuid.uuid4().bytes).hexdigest()
    with pytest.raises(ollama.ResponseError) as err:
        await client.create(model=f"codetune-test-missing-{missing[:6]}", files={"model.gguf": f"sha256:{missing}"})
    assert missing in str(err.value.error)
    assert err.value.status_code >= 400


async def test_unknown_models_are_not_found(ollama_host: str) -> None:
    client = ops.make_client(ollama_host)
    name = f"codetune-test-nope-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ops.OllamaModelNotFoundError, match="not found"):
        await ops.chat(client, name, QUESTION)
    with pytest.raises(ops.OllamaModelNotFoundError):
        await ops.show_model(client, name)
    with pytest.raises(ops.OllamaModelNotFoundError):
        await ops.delete_model(client, name)


async def test_create_delete_roundtrip(ollama_host: str, tiny: TinyArtifacts) -> None:
    client = ops.make_client(ollama_host)
    name = f"codetune-test-tmp-{uuid.uuid4().hex[:8]}"
    template, stop = ollama_template(tiny.base_dir)
    seen: list[str] = []
    created = await ops.create_model(client, name, tiny.base_gguf, tiny.adapter_gguf, template, stop,
                                     "You are terse.", None, parameters={"num_ctx": 256}, on_status=seen.append)
    assert created["statuses"][-1] == "success" and seen == created["statuses"]
    assert set(created["files"]) == {"base.f16.gguf"} and set(created["adapters"]) == {"adapter.f16.gguf"}
    assert "You are terse." in (await ops.show_model(client, name))["modelfile"]
    assert await ops.upload_blob(client, tiny.base_gguf) == created["files"]["base.f16.gguf"]  # already there
    await ops.delete_model(client, name)
    assert f"{name}:latest" not in {m["model"] for m in await ops.list_models(client)}


# --------------------------------------------------------------------------- stand-in specifics


@standin_only
async def test_standin_says_it_is_a_standin(ollama_host: str) -> None:
    async with httpx.AsyncClient(base_url=ollama_host) as http:
        assert "stand-in" in (await http.get("/")).text
        assert "standin" in (await http.get("/api/version")).json()["version"]
        pulled = await http.post("/api/pull", json={"model": "llama3:8b", "stream": False})
        assert pulled.status_code == 404 and "file does not exist" in pulled.json()["error"]


@standin_only
async def test_standin_validates_create_requests(ollama_host: str, tiny: TinyArtifacts) -> None:
    client = ops.make_client(ollama_host)
    digest = await ops.upload_blob(client, tiny.base_gguf)
    lora = await ops.upload_blob(client, tiny.adapter_gguf)
    bad = [
        ({"model": ""}, "model is required"),
        ({"model": "Bad Name!", "files": {"m.gguf": digest}}, "invalid model name"),
        ({"model": "x"}, "neither 'from' or 'files' was specified"),
        ({"model": "x", "files": {"m.gguf": digest}, "template": "{{ if .System }}"}, "template error"),
        ({"model": "x", "files": {"m.gguf": digest}, "quantize": "q3_k_xl"}, "unsupported quantization"),
        ({"model": "x", "files": {"m.gguf": digest}, "parameters": {"temprature": 0.1}}, "unknown parameter"),
        ({"model": "x", "files": {"m.gguf": lora}}, "is a LoRA adapter"),
        ({"model": "x", "files": {"../m.gguf": digest}}, "file path must be relative"),
    ]
    async with httpx.AsyncClient(base_url=ollama_host) as http:
        for body, message in bad:
            r = await http.post("/api/create", json={**body, "stream": False})
            assert r.status_code == 400, body
            assert message in r.json()["error"], (body, r.json())
        assert (await http.head(f"/api/blobs/{digest}")).status_code == 200


@standin_only
async def test_standin_chat_is_real_llama_cpp_inference(ollama_host: str, names: dict[str, str],
                                                        tiny: TinyArtifacts) -> None:
    import xllamacpp as xlc

    client = ops.make_client(ollama_host)
    reply = (await ops.chat(client, names["adapter"], QUESTION, GREEDY)).message.content
    template, _ = ollama_template(tiny.base_dir)
    params = xlc.CommonParams()
    params.model.path = str(tiny.base_gguf)
    params.n_ctx = 256
    params.warmup = False
    params.verbosity = -1
    params.lora_adapters = [xlc.CommonAdapterLoraInfo(str(tiny.adapter_gguf), 1.0)]
    direct = xlc.Server(params).handle_completions({
        "prompt": GoTemplate(template).render_chat(QUESTION), "max_tokens": 12, "temperature": 0.0,
        "stop": ["<|im_end|>", "<|im_start|>"]})
    assert reply == direct["choices"][0]["text"]


@standin_only
async def test_standin_streams_ndjson(ollama_host: str, names: dict[str, str]) -> None:
    import json

    async with httpx.AsyncClient(base_url=ollama_host) as http, http.stream(
            "POST", "/api/chat", json={"model": names["adapter"], "messages": QUESTION, "options": GREEDY}) as r:
        assert r.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) async for line in r.aiter_lines() if line]
    assert all(not x["done"] for x in lines[:-1]) and lines[-1]["done"]
    assert lines[-1]["eval_count"] == GREEDY["num_predict"] and lines[-1]["done_reason"] == "length"


def test_standin_reads_gguf_metadata(tiny: TinyArtifacts, tmp_path: Path) -> None:
    from devkit.gguf_info import read_gguf_info
    from devkit.ollama_standin import _template_from_gguf

    info = read_gguf_info(tiny.base_gguf)
    assert info.token("tokenizer.ggml.eos_token_id") == "<|im_end|>"
    template, stop = _template_from_gguf(info)  # what the stand-in uses when create has no template
    assert template == ollama_template(tiny.base_dir)[0] and "<|im_end|>" in stop


async def test_unreachable_ollama_is_a_transient_error() -> None:
    from core.errors import TransientError

    with pytest.raises(ops.OllamaUnavailableError, match="unreachable") as err:
        await ops.list_models(ops.make_client("http://127.0.0.1:9", timeout_s=5))
    assert isinstance(err.value, TransientError) and err.value.retryable


def test_ollama_errors_keep_ollamas_message() -> None:
    from core.errors import InvalidInputError, NotFoundError

    def mapped(status: int) -> Exception:
        return ops.error_from_response(ollama.ResponseError('{"error": "boom"}', status), "doing x", "m")

    assert isinstance(mapped(404), NotFoundError) and mapped(404).message == "doing x: boom"
    assert isinstance(mapped(400), InvalidInputError) and mapped(400).code == "ollama_bad_request"
    assert isinstance(mapped(500), ops.OllamaError) and not mapped(500).retryable
    assert mapped(503).retryable and mapped(-1).status is None
