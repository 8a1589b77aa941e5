"""Ollama: list / pull / chat as core-NATS request-reply on `ollama.*`, answered by the ollama stage.

Replies are `OllamaReply {ok, result, error}`. No responder → 503 (the ollama stage is not running),
no answer in time → 504, `ok: false` → 404 for a missing model, 400 for a request Ollama refused, 503 when
Ollama is unreachable, 502 otherwise.

`POST /api/v1/ollama/create` (the seed's "create from a Modelfile") maps onto `ollama.create`. The original's
`modelfile` was a path to a file on the server; here it is either the Modelfile's text (it has a newline or
starts with a Modelfile instruction) or the bucket key of a Modelfile (e.g. a job's
`jobs/<job_id>/export/Modelfile`), read from the bucket by the bridge (at most 64 KiB, UTF-8); a bare GGUF
file name in such a Modelfile's `FROM`/`ADAPTER` is resolved next to it. A local filesystem path
(`/…`, `~…`, `./…`, `../…`, `C:`, `file:`) is refused with 422 and nothing is read; a key with no object
is 404. The answer says which it was: `modelfile_source` "text" | "bucket_key" (+ `modelfile_key`).
`FROM` names a GGUF in the bucket (`gguf_path` is its key, as `local_path`/`path` are everywhere in this
API) or a model Ollama already has. Fine-tunes normally need none of this: the export → serving pipeline
creates them with a template translated from the tokenizer.
"""

from __future__ import annotations

import re
from typing import Any

import nats.errors
from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.errors import CodeTuneError, UnsafeKeyError
from core.keys import check_key
from events import subjects as s
from events.client import CodeTuneClient
from events.payloads import (
    ChatMessage,
    OllamaChatReply,
    OllamaChatRequest,
    OllamaCreateRequest,
    OllamaListRequest,
    OllamaModelRef,
)
from handlers.bridge.errors import field_errors, invalid, invalid_field
from handlers.bridge.services import ClientDep, StoreDep
from storage.objects import ObjectStore

router = APIRouter(prefix="/api/v1/ollama", tags=["ollama"])

# how an answer ended (OllamaChatReply), added beside `response` where a chat route's shape allows
ANSWER_FIELDS = tuple(f for f in OllamaChatReply.model_fields if f != "message")
TIMEOUT_S = {s.OLLAMA_MODELS: 10.0, s.OLLAMA_PULL: 600.0, s.OLLAMA_CHAT: 300.0, s.OLLAMA_CREATE: 600.0}


class PullBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)


class ChatBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    options: dict[str, Any] | None = None


class CreateBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1)
    modelfile: str = Field(min_length=4, max_length=65_536,
                           description="the Modelfile's text, or the bucket key of a Modelfile (never a server path)")
    gguf_path: str | None = Field(None, description="bucket key of the GGUF that FROM refers to")


MODELFILE_MAX = 65_536
_INSTRUCTION = re.compile(r"^\s*(#|(FROM|ADAPTER|TEMPLATE|PARAMETER|SYSTEM|LICENSE|MESSAGE|REQUIRES)\s)", re.I)
_LOCAL_PATH = re.compile(r"^(/|~|\.{1,2}(/|\\)|[A-Za-z]:[\\/]|\\|file:)", re.I)
_GGUF_LINE = re.compile(r"^(\s*(?:FROM|ADAPTER)\s+)([A-Za-z0-9._-]+\.gguf)\s*$", re.I | re.M)


def modelfile_source(value: str) -> str:
    """"text" or "bucket_key"; 422 for a local filesystem path or a key the bucket's rule refuses."""
    if "\n" in value.strip() or _INSTRUCTION.match(value):
        return "text"
    candidate = value.strip()
    if _LOCAL_PATH.match(candidate) or "\\" in candidate:
        raise invalid_field(["body", "modelfile"], "a local filesystem path is never read: give the Modelfile's "
                            "text, or the bucket key of a Modelfile (e.g. jobs/<job_id>/export/Modelfile)")
    try:
        check_key(candidate)
    except UnsafeKeyError as e:
        raise invalid_field(["body", "modelfile"], f"neither Modelfile text nor a bucket key: {e.message}") from None
    return "bucket_key"


async def read_modelfile(store: ObjectStore, key: str) -> str:
    """A Modelfile from the bucket; bare GGUF names in FROM/ADAPTER resolve next to it."""
    try:
        size = (await store.stat(key)).size
    except Exception:
        raise HTTPException(404, f"no Modelfile in the bucket at {key!r}") from None
    if size > MODELFILE_MAX:
        raise invalid_field(["body", "modelfile"], f"the Modelfile at {key!r} is {size} bytes "
                            f"(at most {MODELFILE_MAX})")
    try:
        text = (await store.get_bytes(key)).decode()
    except UnicodeDecodeError:
        raise invalid_field(["body", "modelfile"], f"the object at {key!r} is not a UTF-8 Modelfile") from None
    folder = key.rsplit("/", 1)[0] + "/" if "/" in key else ""
    return _GGUF_LINE.sub(lambda m: m.group(1) + folder + m.group(2), text)


async def ask(client: CodeTuneClient, subject: str, payload: BaseModel) -> Any:
    """One request to the ollama stage, its failures as HTTP errors."""
    try:
        return await client.request(subject, payload, timeout=TIMEOUT_S[subject])
    except nats.errors.NoRespondersError:
        raise HTTPException(503, f"no ollama stage answers on {subject} (is `codetune worker ollama` running?)"
                            ) from None
    except nats.errors.TimeoutError:
        raise HTTPException(504, f"the ollama stage did not answer on {subject} in {TIMEOUT_S[subject]:.0f}s"
                            ) from None
    except CodeTuneError as e:
        raise HTTPException(status_for(e.code), e.message) from None


def status_for(code: str) -> int:
    """HTTP status for an ollama stage's error code (`OllamaReply.error.code`)."""
    if code.endswith("not_found"):
        return 404
    if code.endswith(("bad_request", "invalid_input", "invalid_payload", "unsafe_key")):
        return 400
    return 503 if code.endswith(("unavailable", "transient")) else 502


def model_names(result: Any) -> list[str]:
    items = result.get("models", []) if isinstance(result, dict) else result or []
    return [str(m.get("name") or m.get("model")) if isinstance(m, dict) else str(m) for m in items]


def reply_text(result: Any) -> str:
    if isinstance(result, str):
        return result
    if isinstance(result, dict):
        message = result.get("message")
        if isinstance(message, dict) and "content" in message:
            return str(message["content"])
        return str(result.get("response") or result.get("content") or "")
    return ""


@router.get("/models")
async def list_models(client: ClientDep) -> list[str]:
    """Names of the models in Ollama."""
    return model_names(await ask(client, s.OLLAMA_MODELS, OllamaListRequest()))


@router.post("/pull")
async def pull_model(body: PullBody, client: ClientDep) -> dict[str, Any]:
    result = await ask(client, s.OLLAMA_PULL, OllamaModelRef(model=body.model))
    return {"status": "ok", "result": result}


@router.post("/chat")
async def chat(body: ChatBody, client: ClientDep) -> dict[str, Any]:
    """One chat turn: `{response: "..."}`, plus how it ended as Ollama reports it (`done_reason` "stop" or
    "length", `eval_count`, `prompt_eval_count`, durations in ns) and the ollama stage's `result`."""
    try:
        request = OllamaChatRequest(model=body.model, messages=body.messages, options=body.options)
    except ValidationError as e:
        raise invalid(field_errors(e)) from None
    result = await ask(client, s.OLLAMA_CHAT, request)
    ended = {k: result.get(k) for k in ANSWER_FIELDS} if isinstance(result, dict) else {}
    return {"response": reply_text(result), **ended, "result": result}


@router.post("/create")
async def create_model(body: CreateBody, client: ClientDep, store: StoreDep) -> dict[str, Any]:
    """Create a model from a Modelfile (its text or its bucket key): `{status: "ok", modelfile_source}`."""
    source = modelfile_source(body.modelfile)
    key = body.modelfile.strip() if source == "bucket_key" else None
    text = await read_modelfile(store, key) if key else body.modelfile
    try:
        request = OllamaCreateRequest(name=body.name, modelfile=text, gguf_key=body.gguf_path)
    except ValidationError as e:
        raise invalid(field_errors(e)) from None
    result = await ask(client, s.OLLAMA_CREATE, request)
    return {"status": "ok", "modelfile_source": source, "modelfile_key": key, "result": result}
