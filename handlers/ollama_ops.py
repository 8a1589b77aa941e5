"""Ollama operations over the official `ollama.AsyncClient`: publish GGUF models, list, pull, show, chat.

Plain async functions; the caller passes the client (`client_for(settings.ollama_host)`). Every Ollama
failure becomes a `CodeTuneError` carrying Ollama's own message:

- 404 (unknown model)                         → `OllamaModelNotFoundError` (a `NotFoundError`)
- other 4xx (bad name, unknown blob, template) → `OllamaRequestError` (an `InvalidInputError`)
- 5xx, or an error line inside a stream       → `OllamaError` (retryable when 502/503/504)
- connection refused / timeouts               → `OllamaUnavailableError` (a `TransientError`)

Publishing follows Ollama's documented flow: `create_blob` for each GGUF (`POST /api/blobs/sha256:…`),
then `create(model=…, files={name: digest}, adapters={name: digest}, template=…, system=…,
parameters={"stop": […]}, quantize=…)`. There is no Modelfile-string argument in the current API.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from core.errors import (
    CodeTuneError,
    OllamaError,
    OllamaModelNotFoundError,
    OllamaRequestError,
    OllamaUnavailableError,
)
from events.payloads import ChatMessage, OllamaChatReply

if TYPE_CHECKING:
    import ollama

# Shared by the serving stage (publish) and the ollama request-reply stage (list, pull, show, delete, chat,
# create). `ollama` (and its httpx) are imported by the first call that talks to Ollama, not when a stage
# loads: a serving worker woken for a `model.exported` it has to dead-letter answers without them.

log = logging.getLogger("codetune.ollama")

DEFAULT_TIMEOUT_S = 600.0


def make_client(host: str, *, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> ollama.AsyncClient:
    """An `ollama.AsyncClient` for `host` (e.g. `settings.ollama_host`)."""
    import ollama

    return ollama.AsyncClient(host=host, timeout=timeout_s)


# one client per event loop and host, reused by every request and publish (a new client builds a TLS
# context: ~30 ms); per loop because an httpx client is bound to the loop it first ran on
_clients: WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, ollama.AsyncClient]] = WeakKeyDictionary()


def client_for(host: str) -> ollama.AsyncClient:
    """The shared `ollama.AsyncClient` for `host` on the running event loop."""
    mine = _clients.setdefault(asyncio.get_running_loop(), {})
    if host not in mine:
        mine[host] = make_client(host)
    return mine[host]


# --------------------------------------------------------------------------- publish


async def upload_blob(client: ollama.AsyncClient, path: Path) -> str:
    """Upload one file to Ollama's blob store unless Ollama already has it; return `sha256:<hex>`.

    The digest is computed first and checked with `HEAD /api/blobs/:digest`, so a base GGUF shared by
    many fine-tunes is uploaded once; otherwise `client.create_blob` streams it.
    """
    path = Path(path)
    if not path.is_file():
        raise OllamaRequestError(f"cannot upload {path}: no such file")
    digest = await asyncio.to_thread(file_digest, path)
    if await _has_blob(client, digest):
        log.info("Ollama already has %s (%s)", path.name, digest)
        return digest
    async with _errors(f"uploading {path.name}"):
        uploaded = await client.create_blob(path)
    if uploaded != digest:
        raise OllamaError(f"uploading {path.name}: the file changed while it was uploaded")
    return uploaded


def file_digest(path: Path) -> str:
    """`sha256:<hex>` of a file, as Ollama names blobs."""
    with Path(path).open("rb") as f:
        return f"sha256:{hashlib.file_digest(f, 'sha256').hexdigest()}"


async def _has_blob(client: ollama.AsyncClient, digest: str) -> bool:
    import httpx

    http = getattr(client, "_client", None)  # the client's own httpx.AsyncClient (host, headers, timeout)
    if not isinstance(http, httpx.AsyncClient):
        return False
    try:
        response = await http.head(f"/api/blobs/{digest}")
    except httpx.TransportError:
        return False  # create_blob will report the connection problem
    return response.status_code == 200


async def create_model(client: ollama.AsyncClient, name: str, model_gguf: Path, adapter_gguf: Path | None = None,
                       template: str | None = None, stop: Sequence[str] | None = None, system: str | None = None,
                       quantize: str | None = None, *, parameters: Mapping[str, Any] | None = None,
                       on_status: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Upload the GGUF file(s) and create model `name` in Ollama; return what was created.

    `parameters` adds Ollama options (e.g. `num_ctx`) next to `stop`. `on_status` receives each progress
    status line of the create stream. Returns `{"model", "files", "adapters", "statuses"}`.
    """
    files = {_gguf_name(model_gguf, "model.gguf"): await upload_blob(client, model_gguf)}
    adapters = None
    if adapter_gguf is not None:
        adapters = {_gguf_name(adapter_gguf, "adapter.gguf"): await upload_blob(client, adapter_gguf)}
    params: dict[str, Any] = dict(parameters or {})
    if stop:
        params["stop"] = list(stop)
    statuses: list[str] = []
    async with _errors(f"creating model {name}", model=name):
        stream = await client.create(model=name, files=files, adapters=adapters, template=template or None,
                                     system=system or None, parameters=params or None,
                                     quantize=quantize or None, stream=True)
        async for progress in stream:
            if progress.status:
                statuses.append(progress.status)
                if on_status:
                    on_status(progress.status)
    if not statuses or statuses[-1] != "success":
        raise OllamaError(f"creating model {name}: the create stream ended without success ({statuses[-3:]})")
    log.info("created Ollama model %s (%s)", name, ", ".join([*files, *(adapters or {})]))
    return {"model": name, "files": files, "adapters": adapters or {}, "statuses": statuses}


async def create_from(client: ollama.AsyncClient, name: str, base: str, template: str | None,
                      parameters: Mapping[str, Any] | None, system: str | None) -> None:
    """Create `name` from a model Ollama already has, with a new template / parameters / system."""
    async with _errors(f"creating model {name}", model=name):
        await client.create(model=name, from_=base, template=template or None, system=system or None,
                            parameters=dict(parameters or {}) or None, stream=False)


def _gguf_name(path: Path, default: str) -> str:
    """Ollama detects the format from the file name: keep `.gguf` names, else use a default one."""
    name = Path(path).name
    return name if name.endswith(".gguf") else default


# --------------------------------------------------------------------------- inspect / manage


async def list_models(client: ollama.AsyncClient) -> list[dict[str, Any]]:
    """`GET /api/tags`: the local models (name, size, digest, modified_at, details)."""
    async with _errors("listing models"):
        response = await client.list()
    return [m.model_dump(mode="json") for m in response.models]


async def pull_model(client: ollama.AsyncClient, name: str) -> str:
    """`POST /api/pull`; returns the final status (`success`)."""
    async with _errors(f"pulling {name}", model=name):
        response = await client.pull(model=name, stream=False)
    return str(response.status)


async def show_model(client: ollama.AsyncClient, name: str) -> dict[str, Any]:
    """`POST /api/show`: template, parameters, modelfile, details of model `name`."""
    async with _errors(f"showing {name}", model=name):
        response = await client.show(name)
    return response.model_dump(mode="json", by_alias=True)


async def delete_model(client: ollama.AsyncClient, name: str) -> None:
    """`DELETE /api/delete` model `name`."""
    async with _errors(f"deleting {name}", model=name):
        await client.delete(name)


# --------------------------------------------------------------------------- chat


async def chat(client: ollama.AsyncClient, model: str, messages: Sequence[Mapping[str, Any]],
               options: Mapping[str, Any] | None = None) -> OllamaChatReply:
    """One chat turn; returns the assistant's reply with how it ended (`done_reason`, counts, durations)."""
    async with _errors(f"chatting with {model}", model=model):
        response = await client.chat(model=model, messages=[dict(m) for m in messages],
                                     options=dict(options) if options else None, stream=False)
    return OllamaChatReply(
        message=ChatMessage(role="assistant", content=response.message.content or ""),
        **{f: getattr(response, f, None) for f in OllamaChatReply.model_fields if f != "message"})


async def chat_stream(client: ollama.AsyncClient, model: str, messages: Sequence[Mapping[str, Any]],
                      options: Mapping[str, Any] | None = None) -> AsyncIterator[str]:
    """One chat turn, streamed: yields the reply's text pieces as Ollama sends them."""
    async with _errors(f"chatting with {model}", model=model):
        stream = await client.chat(model=model, messages=[dict(m) for m in messages],
                                   options=dict(options) if options else None, stream=True)
        async for part in stream:
            if part.message.content:
                yield part.message.content


# --------------------------------------------------------------------------- errors


@contextlib.asynccontextmanager
async def _errors(action: str, *, model: str | None = None) -> AsyncIterator[None]:
    import httpx
    import ollama

    try:
        yield
    except ollama.ResponseError as e:
        raise error_from_response(e, action, model) from e
    except (ConnectionError, httpx.TransportError) as e:
        raise OllamaUnavailableError(f"{action}: Ollama is unreachable ({type(e).__name__}: {e})") from e


def error_from_response(e: ollama.ResponseError, action: str, model: str | None = None) -> CodeTuneError:
    """Map an `ollama.ResponseError` to a `CodeTuneError`, keeping Ollama's message."""
    status = e.status_code
    message = f"{action}: {e.error}"
    if status == 404:
        return OllamaModelNotFoundError(message)
    if 400 <= status < 500:
        return OllamaRequestError(message)
    return OllamaError(message, status=status if status > 0 else None, retryable=status in (502, 503, 504))
