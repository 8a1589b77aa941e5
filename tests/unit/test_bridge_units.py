"""The bridge's plain functions, without the stack: signatures, seed mapping, the upload pipe, replies."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import IO, Any

import nats.errors
import pytest
from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError

from handlers.bridge.routes.ollama import ask, model_names, reply_text
from handlers.bridge.seed import QUANTIZATION, SeedParameters, seed_parameters, tuning_request
from handlers.bridge.signatures import SignatureError, sign_github, sign_standard, standard_key, verify
from handlers.bridge.upload import ChunkPipe, receive_file
from handlers.tuning.saved import request_from_saved

SECRET = "whsec_" + base64.b64encode(b"unit-test-secret").decode()
BODY = b'{"job_id": "job-123"}'
NOW = 1_700_000_000


# --------------------------------------------------------------------------- signatures


def std(msg_id: str = "msg_1", ts: int = NOW, body: bytes = BODY, secret: str = SECRET) -> dict[str, str]:
    return {"Webhook-Id": msg_id, "Webhook-Timestamp": str(ts),
            "Webhook-Signature": sign_standard(secret, msg_id, ts, body)}


def test_standard_webhooks_signature_round_trip_and_key_decoding() -> None:
    assert standard_key(SECRET) == b"unit-test-secret" and standard_key("plain") == b"plain"
    assert verify(std(), BODY, SECRET, 300, now=NOW) == "msg_1"
    # several signatures (key rotation): any v1 match passes
    h = std() | {"Webhook-Signature": "v1,AAAA v2,zzz " + std()["Webhook-Signature"]}
    assert verify(h, BODY, SECRET, 300, now=NOW) == "msg_1"


def test_standard_webhooks_spec_vector() -> None:
    """The example from the Standard Webhooks reference libraries."""
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    sig = sign_standard(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    assert sig == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


@pytest.mark.parametrize(("headers", "now", "error"), [
    ({}, NOW, "missing signature"),
    (std(secret="whsec_" + base64.b64encode(b"other").decode()), NOW, "does not match"),
    (std(body=b"{}"), NOW, "does not match"),
    (std(), NOW + 301, "tolerance"),
    (std(), NOW - 301, "tolerance"),
    ({k: v for k, v in std().items() if k != "Webhook-Id"}, NOW, "needs webhook-id"),
    (std() | {"Webhook-Timestamp": "soon"}, NOW, "not an integer"),
    ({"X-Hub-Signature-256": "sha256=00"}, NOW, "X-Hub-Signature-256"),
])
def test_bad_signatures_are_refused(headers: dict[str, str], now: int, error: str) -> None:
    with pytest.raises(SignatureError, match=error):
        verify(headers, BODY, SECRET, 300, now=now)


def test_github_signature() -> None:
    sig = sign_github("gh-secret", BODY)
    assert sig == "sha256=" + __import__("hmac").new(b"gh-secret", BODY, hashlib.sha256).hexdigest()
    assert verify({"X-Hub-Signature-256": sig, "X-GitHub-Delivery": "d-1"}, BODY, "gh-secret", 300) == "d-1"
    assert verify({"X-Hub-Signature-256": sig}, BODY, "gh-secret", 300) is None


# --------------------------------------------------------------------------- seed mapping


@pytest.mark.parametrize(("quantization", "outtype", "quantize"), [
    ("none", "f16", None), ("int8", "q8_0", None), ("int4", "f16", "q4_K_M")])
def test_quantization_presets_map_to_real_types(quantization: str, outtype: str, quantize: str | None) -> None:
    params = SeedParameters(repo_id="org/model", quantization=quantization)  # type: ignore[arg-type]
    request, ignored = tuning_request("ds-abc", params)
    assert request.export is not None and (request.export.outtype, request.export.quantize) == (outtype, quantize)
    assert request.hyperparameters.learning_rate == 5e-5 and ignored == []
    assert QUANTIZATION[quantization] == request.export


def test_seed_parameters_round_trip_through_a_saved_model() -> None:
    params = SeedParameters(repo_id="org/model", name="my-model", epochs=2, trainingSteps=40, learningRate=1e-4,
                            quantization="int8", lora_r=16)  # type: ignore[call-arg]
    first, _ = tuning_request("ds-abc", params)
    shown = seed_parameters(first.base_model, first.name, first.hyperparameters.model_dump(),
                            first.export.model_dump() if first.export else None)
    saved = SimpleNamespace(parameters=json.loads(json.dumps(shown)), dataset_id="ds-abc", base_model=None)
    again = request_from_saved(saved)  # type: ignore[arg-type]
    assert again.model_dump(exclude={"job_id"}) == first.model_dump(exclude={"job_id"})
    assert again.hyperparameters.lora_r == 16 and again.job_id != first.job_id
    override = request_from_saved(saved, {"learning_rate": 3e-4, "dataset_id": "ds-other"})  # type: ignore[arg-type]
    assert override.hyperparameters.learning_rate == 3e-4 and override.dataset_id == "ds-other"
    assert override.hyperparameters.lora_r == 16 and override.export == first.export


def test_typed_errors_are_reported_under_the_seed_names() -> None:
    with pytest.raises(RequestValidationError) as e:
        tuning_request("ds-abc", SeedParameters(repo_id="org/model", learningRate=3, trainingSteps=0))
    assert sorted(tuple(x["loc"]) for x in e.value.errors()) == [
        ("body", "parameters", "learningRate"), ("body", "parameters", "trainingSteps")]


# --------------------------------------------------------------------------- upload pipe


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "b0undary") -> tuple[str, list[bytes]]:
    out = b""
    for name, filename, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", [out[i:i + 7000] for i in range(0, len(out), 7000)]


async def chunks(items: list[bytes]) -> AsyncIterator[bytes]:
    for item in items:
        yield item


async def hashing_sink(name: str, stream: IO[bytes]) -> tuple[str, str, int]:
    def read() -> tuple[str, str, int]:
        h, n = hashlib.sha256(), 0
        while data := stream.read(3 * 1024 * 1024):
            h.update(data)
            n += len(data)
        return name, h.hexdigest(), n

    return await asyncio.to_thread(read)


async def test_receive_file_streams_the_file_and_collects_fields() -> None:
    data = bytes(range(256)) * 20_000  # 5 MB, with CR/LF bytes inside
    ctype, body = multipart([("format", None, b"chat"), ("file", "a b.jsonl", data), ("name", None, b"n")])
    got = await receive_file(chunks(body), ctype, "file", hashing_sink)
    assert got.result == ("a b.jsonl", hashlib.sha256(data).hexdigest(), len(data))
    assert got.size == len(data) and got.filename == "a b.jsonl" and got.fields == {"format": "chat", "name": "n"}


async def test_receive_file_errors() -> None:
    ctype, body = multipart([("other", "x.txt", b"x")])
    with pytest.raises(RequestValidationError):
        await receive_file(chunks(body), ctype, "file", hashing_sink)
    ctype, body = multipart([("file", "x.txt", b"x" * 100_000)])
    with pytest.raises(RequestValidationError, match="ended before"):
        await receive_file(chunks(body[:-1]), ctype, "file", hashing_sink)  # truncated: the reader is aborted
    with pytest.raises(HTTPException) as e:
        await receive_file(chunks([b"{}"]), "application/json", "file", hashing_sink)
    assert e.value.status_code == 415


async def test_chunk_pipe_is_bounded_and_gives_the_reader_whole_parts() -> None:
    loop = asyncio.get_running_loop()
    pipe = ChunkPipe(loop, block=1000, depth=2)
    release = threading.Event()
    reads: list[int] = []

    def reader() -> None:
        release.wait()
        while data := pipe.read(4500):
            reads.append(len(data))

    task = asyncio.ensure_future(asyncio.to_thread(reader))
    for _ in range(4):  # 2 blocks fit; the writer then waits for the reader
        await asyncio.wait_for(pipe.write_async(b"x" * 500, task), 1)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(pipe.write_async(b"x" * 1000, task)), 0.2)
    release.set()
    for _ in range(10):
        await pipe.write_async(b"y" * 700, task)
    await pipe.close_async(task)
    await task
    assert sum(reads) == 4 * 500 + 1000 + 10 * 700 and all(n == 4500 for n in reads[:-1])


async def test_a_failing_reader_stops_the_writer() -> None:
    pipe = ChunkPipe(asyncio.get_running_loop(), block=10, depth=1)

    def reader() -> None:
        pipe.read(10)
        raise OSError("S3 went away")

    task = asyncio.ensure_future(asyncio.to_thread(reader))
    with pytest.raises(OSError, match="S3 went away"):
        for _ in range(100):
            await asyncio.wait_for(pipe.write_async(b"z" * 10, task), 2)


# --------------------------------------------------------------------------- Ollama replies


def test_ollama_replies_are_read_in_the_seed_shapes() -> None:
    listed = [{"model": "tiny:latest", "size": 1, "details": {}}, {"name": "other"}, "plain"]
    assert model_names(listed) == ["tiny:latest", "other", "plain"]
    assert model_names({"models": [{"name": "a"}]}) == ["a"] and model_names(None) == []
    assert reply_text({"message": {"role": "assistant", "content": "Paris."}}) == "Paris."
    assert reply_text({"response": "Rome."}) == "Rome." and reply_text("Oslo.") == "Oslo."


class _NoOllamaStage:
    def __init__(self, error: Exception) -> None:
        self.error = error

    async def request(self, *args: Any, **kw: Any) -> Any:
        raise self.error


@pytest.mark.parametrize(("error", "status"), [
    (nats.errors.NoRespondersError(), 503), (nats.errors.TimeoutError(), 504)])
async def test_no_ollama_stage_is_503_and_a_slow_one_504(error: Exception, status: int) -> None:
    from events.payloads import OllamaListRequest

    with pytest.raises(HTTPException) as e:
        await ask(_NoOllamaStage(error), "ollama.models", OllamaListRequest())  # type: ignore[arg-type]
    assert e.value.status_code == status and "ollama.models" in e.value.detail
    assert status == 504 or "codetune worker ollama" in e.value.detail  # names the stage to start
