"""ollama stage: the core-NATS request-reply subjects `ollama.models`, `ollama.pull`, `ollama.show`,
`ollama.delete`, `ollama.chat` and `ollama.create`, answered from Ollama (handlers/ollama_ops.py).

Core NATS, not JetStream: a request nobody answers is not kept, it fails at once with "no responders".
So this stage is always on (at least one worker; README "Scaling out"), while the serving stage, which only
consumes `model.exported` from its durable consumer, scales to zero. Queue group `ollama`: any number of
workers share the requests. Every request gets an `OllamaReply` (a bad one an error naming what is wrong,
handlers.common.ErrorReplies); the stage publishes nothing but these replies.
"""

from typing import Any

from core.settings import Settings
from events import subjects as sj
from events.payloads import (
    OllamaChatRequest,
    OllamaCreateRequest,
    OllamaListRequest,
    OllamaModelRef,
    OllamaReply,
)
from handlers import ollama_ops
from handlers.common import SettingsDep, StoreDep, handler, request_router
from handlers.ollama.service import create_from_modelfile

router = request_router()
QUEUE = "ollama"


def _client(settings: Settings) -> Any:
    return ollama_ops.client_for(settings.ollama_host)


@router.subscriber(sj.OLLAMA_MODELS, queue=QUEUE, title="ollama:ollama.models")
@handler
async def list_models(event: OllamaListRequest, settings: SettingsDep) -> OllamaReply:
    return OllamaReply(result=await ollama_ops.list_models(_client(settings)))


@router.subscriber(sj.OLLAMA_PULL, queue=QUEUE, title="ollama:ollama.pull")
@handler
async def pull_model(event: OllamaModelRef, settings: SettingsDep) -> OllamaReply:
    return OllamaReply(result=await ollama_ops.pull_model(_client(settings), event.model))


@router.subscriber(sj.OLLAMA_SHOW, queue=QUEUE, title="ollama:ollama.show")
@handler
async def show_model(event: OllamaModelRef, settings: SettingsDep) -> OllamaReply:
    return OllamaReply(result=await ollama_ops.show_model(_client(settings), event.model))


@router.subscriber(sj.OLLAMA_DELETE, queue=QUEUE, title="ollama:ollama.delete")
@handler
async def delete_model(event: OllamaModelRef, settings: SettingsDep) -> OllamaReply:
    await ollama_ops.delete_model(_client(settings), event.model)
    return OllamaReply(result={"deleted": event.model})


@router.subscriber(sj.OLLAMA_CHAT, queue=QUEUE, title="ollama:ollama.chat")
@handler
async def chat(event: OllamaChatRequest, settings: SettingsDep) -> OllamaReply:
    messages = [m.model_dump() for m in event.messages]
    reply = await ollama_ops.chat(_client(settings), event.model, messages, options=event.options)
    return OllamaReply(result=reply.model_dump())


@router.subscriber(sj.OLLAMA_CREATE, queue=QUEUE, title="ollama:ollama.create")
@handler
async def create(event: OllamaCreateRequest, store: StoreDep, settings: SettingsDep) -> OllamaReply:
    return OllamaReply(result=await create_from_modelfile(event, store, settings))
