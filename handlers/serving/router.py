"""serving stage: `model.exported` → Ollama create → ServedModel → `model.published`; and Ollama
request-reply subjects (`ollama.models`, `ollama.pull`, `ollama.show`, `ollama.delete`, `ollama.chat`).

Ack policy for `model.exported`: MANUAL via FailurePolicy — acked after the model exists in Ollama and
`model.published` is out; Ollama refusing the model → `model.publish.failed`; Ollama unreachable →
retried with backoff, then dead-lettered. A fact for an unknown job, or one that is not the job's
recorded export, is dead-lettered and changes nothing; a second one for a job already publishing or
published is acked and ignored (handlers/serving/service.py). Request-reply subjects are core NATS
(queue group `serving`, so any number of serving workers share them); every request gets an `OllamaReply`.
"""

from typing import Any

from faststream.nats import NatsRouter

from core.settings import Settings
from events import subjects as sj
from events.payloads import (
    ModelExported,
    OllamaChatRequest,
    OllamaCreateRequest,
    OllamaListRequest,
    OllamaModelRef,
    OllamaReply,
)
from events.streams import SERVING_ON_EXPORTED
from handlers.common import (
    MessageDep,
    Outputs,
    SettingsDep,
    StoreDep,
    incoming,
    jetstream_subscriber,
    pipeline_router,
    request_router,
)
from handlers.serving import ollama_ops
from handlers.serving.service import create_from_modelfile, publish

events = pipeline_router()
outputs = Outputs(events, "serving", sj.MODEL_PUBLISHED, sj.MODEL_PUBLISH_FAILED, letters=[SERVING_ON_EXPORTED])
requests = request_router()
QUEUE = "serving"


@events.subscriber(**jetstream_subscriber(SERVING_ON_EXPORTED), title="serving:model.exported")
async def on_model_exported(
    event: ModelExported, msg: MessageDep, store: StoreDep, settings: SettingsDep
) -> None:
    parent = incoming(msg)
    answer = await publish(event, store, settings, redelivered=parent.num_delivered > 1)
    if answer is not None:
        await outputs.emit(answer, parent)


def _client(settings: Settings) -> Any:
    return ollama_ops.make_client(settings.ollama_host)


@requests.subscriber(sj.OLLAMA_MODELS, queue=QUEUE, title="serving:ollama.models")
async def list_models(event: OllamaListRequest, settings: SettingsDep) -> OllamaReply:
    return OllamaReply(result=await ollama_ops.list_models(_client(settings)))


@requests.subscriber(sj.OLLAMA_PULL, queue=QUEUE, title="serving:ollama.pull")
async def pull_model(event: OllamaModelRef, settings: SettingsDep) -> OllamaReply:
    return OllamaReply(result=await ollama_ops.pull_model(_client(settings), event.model))


@requests.subscriber(sj.OLLAMA_SHOW, queue=QUEUE, title="serving:ollama.show")
async def show_model(event: OllamaModelRef, settings: SettingsDep) -> OllamaReply:
    return OllamaReply(result=await ollama_ops.show_model(_client(settings), event.model))


@requests.subscriber(sj.OLLAMA_DELETE, queue=QUEUE, title="serving:ollama.delete")
async def delete_model(event: OllamaModelRef, settings: SettingsDep) -> OllamaReply:
    await ollama_ops.delete_model(_client(settings), event.model)
    return OllamaReply(result={"deleted": event.model})


@requests.subscriber(sj.OLLAMA_CHAT, queue=QUEUE, title="serving:ollama.chat")
async def chat(event: OllamaChatRequest, settings: SettingsDep) -> OllamaReply:
    messages = [m.model_dump() for m in event.messages]
    reply = await ollama_ops.chat(_client(settings), event.model, messages, options=event.options)
    return OllamaReply(result=reply.model_dump())


@requests.subscriber(sj.OLLAMA_CREATE, queue=QUEUE, title="serving:ollama.create")
async def create(event: OllamaCreateRequest, store: StoreDep, settings: SettingsDep) -> OllamaReply:
    return OllamaReply(result=await create_from_modelfile(event, store, settings))


# composition only: each child keeps its own failure policy
router = NatsRouter()
router.include_routers(events, requests)
