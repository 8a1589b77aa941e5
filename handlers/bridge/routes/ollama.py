"""Ollama: list / pull / chat as core-NATS request-reply on `ollama.*`, answered by the serving stage.

Replies are `OllamaReply {ok, result, error}`. No responder → 503 (the serving stage is not running),
no answer in time → 504, `ok: false` → 404 for a missing model, 400 for a request Ollama refused, 503 when
Ollama is unreachable, 502 otherwise.

`POST /api/v1/ollama/create` (the seed's "create from a Modelfile") maps onto `ollama.create`: `FROM`
names a GGUF in the bucket (`gguf_path` is its key, as `local_path`/`path` are everywhere in this API) or a
model Ollama already has. Fine-tunes normally need none of this: the export → serving pipeline creates
them with a template translated from the tokenizer.
"""

from __future__ import annotations

from typing import Any

import nats.errors
from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from events import subjects as s
from events.client import CodeTuneClient
from events.errors import CodeTuneError
from events.payloads import (
    ChatMessage,
    OllamaChatReply,
    OllamaChatRequest,
    OllamaCreateRequest,
    OllamaListRequest,
    OllamaModelRef,
)
from handlers.bridge.errors import field_errors, invalid
from handlers.bridge.services import ClientDep

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
    modelfile: str = Field(min_length=4)
    gguf_path: str | None = Field(None, description="bucket key of the GGUF that FROM refers to")


async def ask(client: CodeTuneClient, subject: str, payload: BaseModel) -> Any:
    """One request to the serving stage, its failures as HTTP errors."""
    try:
        return await client.request(subject, payload, timeout=TIMEOUT_S[subject])
    except nats.errors.NoRespondersError:
        raise HTTPException(503, f"no serving stage answers on {subject} (is `codetune worker serving` running?)"
                            ) from None
    except nats.errors.TimeoutError:
        raise HTTPException(504, f"the serving stage did not answer on {subject} in {TIMEOUT_S[subject]:.0f}s"
                            ) from None
    except CodeTuneError as e:
        raise HTTPException(status_for(e.code), e.message) from None


def status_for(code: str) -> int:
    """HTTP status for a serving stage's error code (`OllamaReply.error.code`)."""
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
    "length", `eval_count`, `prompt_eval_count`, durations in ns) and the serving stage's `result`."""
    try:
        request = OllamaChatRequest(model=body.model, messages=body.messages, options=body.options)
    except ValidationError as e:
        raise invalid(field_errors(e)) from None
    result = await ask(client, s.OLLAMA_CHAT, request)
    ended = {k: result.get(k) for k in ANSWER_FIELDS} if isinstance(result, dict) else {}
    return {"response": reply_text(result), **ended, "result": result}


@router.post("/create")
async def create_model(body: CreateBody, client: ClientDep) -> dict[str, Any]:
    """Create a model from a Modelfile: `{status: "ok"}`."""
    try:
        request = OllamaCreateRequest(name=body.name, modelfile=body.modelfile, gguf_key=body.gguf_path)
    except ValidationError as e:
        raise invalid(field_errors(e)) from None
    result = await ask(client, s.OLLAMA_CREATE, request)
    return {"status": "ok", "result": result}
