"""The ollama stage's one request with an effect beyond Ollama: `ollama.create` (the original's
/ollama/create), a Modelfile whose FROM is a GGUF in the bucket or a model Ollama already has.

The GGUF keys are checked with the same key rule as every other key (core.keys.check_key) before anything is
fetched; the model is recorded as a `ServedModel` once Ollama has it.
"""

from __future__ import annotations

from typing import Any

from core.errors import InvalidInputError
from core.settings import Settings
from events.payloads import OllamaCreateRequest
from handlers import ollama_ops
from storage.documents import ServedModel
from storage.objects import ObjectStore


async def create_from_modelfile(req: OllamaCreateRequest, store: ObjectStore, settings: Settings) -> dict[str, Any]:
    """The original's /ollama/create: a Modelfile whose FROM is a GGUF in the bucket (or an Ollama model)."""
    from core.keys import check_key
    from handlers.ollama_format.modelfile import parse_modelfile

    mf = parse_modelfile(req.modelfile)
    client = ollama_ops.client_for(settings.ollama_host)
    cache = settings.scratch_dir / "gguf"
    gguf_key = req.gguf_key or (mf.from_ if mf.from_.endswith(".gguf") else None)
    if gguf_key is None:  # FROM an existing Ollama model: only the Modelfile's settings change
        if mf.adapter:
            raise InvalidInputError("ADAPTER needs FROM to name a GGUF in the bucket (or pass gguf_key)")
        await ollama_ops.create_from(client, req.name, mf.from_, mf.template, mf.parameters, mf.system)
        return {"model": req.name, "from": mf.from_}
    model_path = await store.fetch(check_key(gguf_key), cache)
    adapter_path = await store.fetch(check_key(mf.adapter), cache) if mf.adapter else None
    stop = mf.parameters.pop("stop", None)
    created = await ollama_ops.create_model(client, req.name, model_path, adapter_path, mf.template, stop,
                                            mf.system, parameters=mf.parameters)
    await ServedModel.upsert_by({"name": req.name}, {"ollama_host": settings.ollama_host, "files": created["files"],
                                                    "adapters": created["adapters"]})
    return {"model": req.name, "files": created["files"], "adapters": created["adapters"]}
