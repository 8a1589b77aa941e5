"""`POST /api/v1/assistant/chat` `{messages, model?}` → `{response}`: the original sent this to a hosted model;
here it is one `ollama.chat` to the named model, or to `CODETUNE_ASSISTANT_MODEL` when the request names
none (422 naming the setting when neither is given). Ollama's errors answer as on `/api/v1/ollama/chat`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from events import subjects as s
from events.payloads import ChatMessage, OllamaChatRequest
from handlers.bridge.errors import field_errors, invalid, invalid_field
from handlers.bridge.routes.ollama import ask, reply_text
from handlers.bridge.services import ClientDep, SettingsDep

router = APIRouter(prefix="/api/v1/assistant", tags=["assistant"])


class AssistantBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = Field(None, min_length=1, max_length=256, description="default: CODETUNE_ASSISTANT_MODEL")


class AssistantAnswer(BaseModel):
    response: str
    model: str


@router.post("/chat", response_model=AssistantAnswer)
async def assistant_chat(body: AssistantBody, client: ClientDep, settings: SettingsDep) -> AssistantAnswer:
    """One chat turn with the named (or the configured) Ollama model."""
    model = body.model or settings.assistant_model
    if not model:
        raise invalid_field(["body", "model"], "no model named and none configured: pass `model` or set "
                            "CODETUNE_ASSISTANT_MODEL on the bridge", "missing")
    try:
        request = OllamaChatRequest(model=model, messages=body.messages)
    except ValidationError as e:
        raise invalid(field_errors(e)) from None
    result: Any = await ask(client, s.OLLAMA_CHAT, request)
    return AssistantAnswer(response=reply_text(result), model=model)
