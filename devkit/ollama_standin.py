"""An Ollama STAND-IN for tests and offline development — NOT Ollama.

No Ollama server can be installed from the registries these machines reach, so tests that need an Ollama
endpoint use this small Starlette app instead. It implements the documented Ollama HTTP API endpoints that
CodeTune uses and validates requests the way Ollama documents them:

- `HEAD/POST /api/blobs/:digest` — digest `sha256:<hex>`; the body's SHA-256 must match (400 otherwise).
- `POST /api/create` — `model` required; `files`/`adapters` must name uploaded blobs (400 naming the
  missing digest); GGUF only; `template` must parse; NDJSON status stream ending in `{"status":"success"}`
  (one JSON object when `stream` is false). `quantize` is validated and recorded, but the stand-in has no
  quantizer: the weights are served as uploaded (the status stream says so).
- `GET /api/tags`, `POST /api/show`, `DELETE /api/delete`, `GET /api/ps`, `GET /api/version`.
- `POST /api/pull` — only "pulls" models it already has; others get Ollama's 404-style error.
- `POST /api/chat` — REAL llama.cpp inference (xllamacpp, in process) over the uploaded GGUF + LoRA
  adapter, with the prompt rendered from the model's TEMPLATE by `handlers.ollama_format.gotemplate.GoTemplate`
  (Ollama's rules: SYSTEM prepended, same-role messages collated) and stopping at its `stop` parameters.
  Options `num_predict`, `temperature`, `seed`, `top_k`, `top_p`, `min_p`, `repeat_penalty`, `num_ctx`
  are honoured. Unlike Ollama (temperature 0.8) sampling is GREEDY unless a temperature is given.

Errors are answered as Ollama answers them: `{"error": "…"}` with its status (an error after a stream
started is its last NDJSON line); unknown paths `404 page not found`, wrong methods `405 method not allowed`.
GGUF metadata is read with the `gguf` package's `GGUFReader` (`devkit.gguf_info`).

Modules: this one (HTTP: routes and endpoints), `devkit.standin_store` (blobs and manifests under `<dir>`:
`blobs/sha256-<hex>`, `manifests/<name>.json`), `devkit.standin_engine` (llama.cpp inference and options).

Run: `python -m devkit.ollama_standin --host 127.0.0.1 --port 11434 --dir DIR`; in tests:
`with serve_in_thread(dir) as base_url: ollama.AsyncClient(host=base_url)…`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from devkit.gguf_info import GGUFInfo
from devkit.standin_engine import (
    Engine,
    chat_final,
    chat_stream,
    check_options,
    completion,
    completion_request,
)
from devkit.standin_store import ModelRecord, OllamaError, Store, normalize_name, now
from handlers.ollama_format.chat_format import chat_format_from_jinja
from handlers.ollama_format.gotemplate import GoTemplate, TemplateError
from handlers.ollama_format.modelfile import render_modelfile

log = logging.getLogger("codetune.ollama_standin")

STANDIN_VERSION = "0.13.0-codetune-standin"
BANNER = "Ollama stand-in is running (CodeTune test double, NOT Ollama)"
DEFAULT_TEMPLATE = "{{ .Prompt }}"
DEFAULT_NUM_CTX = 4096
QUANTIZE_TYPES = ("Q4_K_M", "Q4_K_S", "Q8_0")  # what Ollama documents for create(quantize=…)

_NAME_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/){0,2}[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
                      r"(?::[A-Za-z0-9_][A-Za-z0-9._-]{0,127})?$")

# =========================================================================== HTTP helpers


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object, or Ollama's 400 for a missing, malformed or non-object body."""
    try:
        raw = await request.body()
    except ClientDisconnect as e:
        raise OllamaError(400, "client disconnected during the request") from e
    if not raw.strip():
        raise OllamaError(400, "missing request body")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise OllamaError(400, f"invalid JSON body: {e}") from e
    if not isinstance(data, dict):
        raise OllamaError(400, "request body must be a JSON object")
    return data


def ndjson(items: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def lines() -> AsyncIterator[bytes]:
        try:
            async for item in items:
                yield json.dumps(item, ensure_ascii=False).encode() + b"\n"
        except OllamaError as e:  # after the headers went out, Ollama reports errors as a stream line
            yield json.dumps({"error": e.message}).encode() + b"\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


async def maybe_stream(body: dict[str, Any], items: AsyncIterator[dict[str, Any]]) -> Response:
    """NDJSON status lines, or with `"stream": false` the last one as a single JSON object."""
    if body.get("stream", True) is False:
        last: dict[str, Any] = {}
        async for item in items:
            last = item
        return JSONResponse(last)
    return ndjson(items)


async def _ollama_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, OllamaError)
    return JSONResponse({"error": exc.message}, exc.status)


async def _routing_error(_: Request, exc: Exception) -> Response:
    """Unknown paths and methods, in the words of Ollama's router (gin)."""
    assert isinstance(exc, HTTPException)
    text = {404: "404 page not found", 405: "405 method not allowed"}.get(exc.status_code, str(exc.detail))
    return PlainTextResponse(text, exc.status_code, headers=exc.headers)


async def _bug(request: Request, exc: Exception) -> Response:
    """A bug in the stand-in: answered like Ollama does, with a 500 and the error (Starlette then re-raises it,
    so the server logs the traceback)."""
    log.error("stand-in error on %s %s: %s", request.method, request.url.path, exc)
    return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, 500)


def _model_field(body: dict[str, Any]) -> str:
    name = body.get("model") or body.get("name")
    if not name or not isinstance(name, str):
        raise OllamaError(400, "model is required")
    return name


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if messages is None:
        return []
    if not isinstance(messages, list):
        raise OllamaError(400, "messages must be an array")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise OllamaError(400, f"messages[{i}]: each message needs a string 'role'")
        if not isinstance(m.get("content", ""), str):
            raise OllamaError(400, f"messages[{i}]: 'content' must be a string")
    return messages


# =========================================================================== the app


class Standin:
    """The endpoints over one store and one inference engine; `standin_app(dir)` is the ASGI app."""

    def __init__(self, root: Path, *, threads: int | None = None) -> None:
        self.store = Store(root)
        self.engine = Engine(threads)

    # ----------------------------------------------------------------- simple endpoints

    async def root(self, _: Request) -> Response:
        return PlainTextResponse(BANNER)

    async def version(self, _: Request) -> Response:
        return JSONResponse({"version": STANDIN_VERSION, "standin": BANNER})

    async def blob(self, request: Request) -> Response:
        digest = request.path_params["digest"]
        if request.method == "HEAD":
            return Response(status_code=200 if self.store.blob_path(digest).is_file() else 404)
        created = await self.store.write_blob(digest, self._upload_chunks(request))
        return Response(status_code=201 if created else 200)

    @staticmethod
    async def _upload_chunks(request: Request) -> AsyncIterator[bytes]:
        try:
            async for chunk in request.stream():
                if chunk:
                    yield chunk
        except ClientDisconnect as e:
            raise OllamaError(400, "client disconnected during upload") from e

    async def tags(self, _: Request) -> Response:
        models = sorted(self.store.all(), key=lambda r: r.created_at, reverse=True)
        return JSONResponse({"models": [r.public() for r in models]})

    async def ps(self, _: Request) -> Response:
        loaded = [r.public() for name in self.engine.loaded() if (r := self.store.get(name))]
        return JSONResponse({"models": loaded})

    async def delete(self, request: Request) -> Response:
        name = _model_field(await json_body(request))
        if not self.store.delete(name):
            raise OllamaError(404, f"model '{name}' not found")
        self.engine.unload(normalize_name(name))
        return Response(status_code=200)

    async def pull(self, request: Request) -> Response:
        body = await json_body(request)
        record = self.store.get(_model_field(body))
        if record is None:
            raise OllamaError(404, "pull model manifest: file does not exist")

        async def statuses() -> AsyncIterator[dict[str, Any]]:
            yield {"status": "pulling manifest"}
            for digest in (*record.files.values(), *record.adapters.values()):
                size = self.store.blob_path(digest).stat().st_size
                yield {"status": f"pulling {digest.removeprefix('sha256:')[:12]}", "digest": digest,
                       "total": size, "completed": size}
            yield {"status": "verifying sha256 digest"}
            yield {"status": "writing manifest"}
            yield {"status": "success"}

        return await maybe_stream(body, statuses())

    async def show(self, request: Request) -> Response:
        name = _model_field(await json_body(request))
        record = self.store.get(name)
        if record is None:
            raise OllamaError(404, f"model '{name}' not found")
        stop = record.parameters.get("stop", [])
        others = {k: v for k, v in record.parameters.items() if k != "stop"}
        modelfile = "# Modelfile generated by the CodeTune Ollama stand-in (not Ollama)\n" + render_modelfile(
            str(self.store.blob_path(next(iter(record.files.values())))),
            str(self.store.blob_path(next(iter(record.adapters.values())))) if record.adapters else None,
            record.template, stop, record.system or None, others)
        params = "\n".join(f"{k:<30} {json.dumps(v) if isinstance(v, str) else v}"
                           for k, vs in record.parameters.items() for v in (vs if isinstance(vs, list) else [vs]))
        return JSONResponse({
            "license": "", "modelfile": modelfile, "parameters": params, "template": record.template,
            "system": record.system, "details": record.details, "model_info": record.model_info,
            "capabilities": ["completion"], "modified_at": record.created_at,
        })

    # ----------------------------------------------------------------- create

    async def create(self, request: Request) -> Response:
        body = await json_body(request)
        plan = await asyncio.to_thread(self._plan_create, body)  # GGUFReader takes seconds on a large vocabulary
        return await maybe_stream(body, self._create_stream(plan))

    def _plan_create(self, body: dict[str, Any]) -> dict[str, Any]:
        raw_name = body.get("model") or body.get("name")
        if not raw_name or not isinstance(raw_name, str):
            raise OllamaError(400, "model is required")
        if not _NAME_RE.match(raw_name):
            raise OllamaError(400, "invalid model name")
        files, adapters = self._files(body, "files"), self._files(body, "adapters")
        base = None
        if body.get("from"):
            base = self.store.get(str(body["from"]))
            if base is None:
                raise OllamaError(404, f"model '{body['from']}' not found")
            files = files or dict(base.files)
            adapters = adapters or dict(base.adapters)
        elif not files:
            raise OllamaError(400, "neither 'from' or 'files' was specified")
        if len(adapters) > 1:
            raise OllamaError(400, "only one adapter is currently supported")
        infos = {d: self._gguf(d, name) for name, d in {**files, **adapters}.items()}
        model_digest = next(iter(files.values()))
        if infos[model_digest].is_adapter:
            raise OllamaError(400, f"{next(iter(files))} is a LoRA adapter GGUF; pass it in 'adapters'")
        quantize = self._check_quantize(body.get("quantize") or body.get("quantization"), infos[model_digest])
        template = body.get("template") or (base.template if base else None)
        params = check_options(body.get("parameters"), strict=True)
        if template is None:
            template, auto_stop = _template_from_gguf(infos[model_digest])
            params.setdefault("stop", auto_stop)
        elif base is not None and "stop" not in params and "stop" in base.parameters:
            params["stop"] = base.parameters["stop"]
        try:
            GoTemplate(str(template))
        except TemplateError as e:
            raise OllamaError(400, f"template error: {e}") from e
        return {"name": normalize_name(raw_name), "files": files, "adapters": adapters, "infos": infos,
                "template": str(template), "system": str(body.get("system") or (base.system if base else "")),
                "parameters": params, "quantize": quantize}

    def _files(self, body: dict[str, Any], key: str) -> dict[str, str]:
        files = body.get(key) or {}
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise OllamaError(400, f"'{key}' must map file names to digests")
        for fname, digest in files.items():
            if fname.startswith("/") or ".." in Path(fname).parts:
                raise OllamaError(400, "file path must be relative")
            if not self.store.blob_path(digest).is_file():
                raise OllamaError(400, f"{key}: blob {digest} for {fname!r} not found; upload it first "
                                     f"(POST /api/blobs/{digest})")
        return dict(files)

    def _gguf(self, digest: str, fname: str) -> GGUFInfo:
        try:
            return self.store.info(digest)
        except (ValueError, OSError) as e:
            raise OllamaError(400, f"supplied file was not in GGUF format ({fname}: {e})") from e

    @staticmethod
    def _check_quantize(quantize: Any, info: GGUFInfo) -> str | None:
        if not quantize:
            return None
        q = str(quantize).upper()
        if q not in QUANTIZE_TYPES:
            raise OllamaError(400, f"unsupported quantization type {quantize}")
        if info.file_type not in ("F16", "F32"):
            raise OllamaError(400, "quantization is only supported for F16 and F32 models")
        return q

    async def _create_stream(self, plan: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        yield {"status": "parsing GGUF"}
        for digest in (*plan["files"].values(), *plan["adapters"].values()):
            yield {"status": f"using existing layer {digest}"}
        info = plan["infos"][next(iter(plan["files"].values()))]
        if plan["quantize"]:
            yield {"status": f"stand-in: quantize={plan['quantize']} recorded; no quantizer here, serving the "
                             f"{info.file_type} weights as uploaded"}
        for kind in ("template", "system", "parameters"):
            if plan[kind]:
                layer = hashlib.sha256(json.dumps(plan[kind], sort_keys=True).encode()).hexdigest()
                yield {"status": f"creating new layer sha256:{layer}"}
        yield {"status": "writing manifest"}
        digests = (*plan["files"].values(), *plan["adapters"].values())
        self.engine.unload(plan["name"])
        self.store.put(ModelRecord(
            name=plan["name"], files=plan["files"], adapters=plan["adapters"], template=plan["template"],
            system=plan["system"], parameters=plan["parameters"], details=_details(info, bool(plan["adapters"])),
            model_info=_model_info(info), size=sum(self.store.blob_path(d).stat().st_size for d in digests),
            created_at=now(), quantize_requested=plan["quantize"]))
        yield {"status": "success"}

    # ----------------------------------------------------------------- chat

    async def chat(self, request: Request) -> Response:
        body = await json_body(request)
        raw_name = body.get("model")
        if not raw_name or not isinstance(raw_name, str):
            raise OllamaError(400, "model is required")
        record = self.store.get(raw_name)
        if record is None:
            raise OllamaError(404, f'model "{raw_name}" not found, try pulling it first')
        messages = _check_messages(body.get("messages"))
        if body.get("tools"):
            raise OllamaError(400, f'"{raw_name}" does not support tools')
        if body.get("think") is True:
            raise OllamaError(400, f'"{raw_name}" does not support thinking')
        opts = {**record.parameters, **check_options(body.get("options"), strict=False)}
        if not messages:
            done = "unload" if body.get("keep_alive") in (0, "0", "0s") else "load"
            if done == "unload":
                self.engine.unload(record.name)
            return JSONResponse({"model": raw_name, "created_at": now(),
                                  "message": {"role": "assistant", "content": ""}, "done_reason": done,
                                  "done": True})
        try:
            prompt = GoTemplate(record.template).render_chat(messages, record.system or None)
        except TemplateError as e:
            raise OllamaError(500, f"template: {e}") from e
        stream = body.get("stream", True) is not False
        req = completion_request(prompt, opts, stream, body.get("format"))
        n_ctx = int(opts.get("num_ctx", min(DEFAULT_NUM_CTX, record.model_info.get("context_length") or
                                            DEFAULT_NUM_CTX)))
        started = time.monotonic_ns()
        server = await asyncio.to_thread(self.engine.server, record, self.store, n_ctx)
        loaded = time.monotonic_ns()
        if not stream:
            result = await asyncio.to_thread(server.handle_completions, req)
            return JSONResponse(chat_final(raw_name, completion(result), started, loaded))
        return ndjson(chat_stream(raw_name, server, req, started, loaded))


def _human_number(n: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}".rstrip("0").rstrip(".") + suffix
    return str(n)



def _details(info: GGUFInfo, has_adapter: bool) -> dict[str, Any]:
    return {"parent_model": "", "format": "gguf", "family": info.architecture,
            "families": [info.architecture] if info.architecture else None,
            "parameter_size": _human_number(info.n_params), "quantization_level": info.file_type,
            "adapter": has_adapter}


def _model_info(info: GGUFInfo) -> dict[str, Any]:
    arch = info.architecture
    keep = {k: v for k, v in info.kv.items() if not isinstance(v, list) and k != "tokenizer.chat_template"}
    keep["general.parameter_count"] = info.n_params
    keep["context_length"] = info.kv.get(f"{arch}.context_length")
    return keep


def _template_from_gguf(info: GGUFInfo) -> tuple[str, list[str]]:
    """Like Ollama without a TEMPLATE: derive one from the GGUF's jinja chat template, else `{{ .Prompt }}`."""
    jinja = info.kv.get("tokenizer.chat_template")
    if not jinja:
        return DEFAULT_TEMPLATE, []
    try:
        fmt = chat_format_from_jinja(jinja, bos_token=info.token("tokenizer.ggml.bos_token_id"),
                                     eos_token=info.token("tokenizer.ggml.eos_token_id"),
                                     add_bos=bool(info.kv.get("tokenizer.ggml.add_bos_token", False)))
    except Exception as e:  # any failure: fall back like Ollama does for unknown templates
        log.warning("no TEMPLATE derived from the GGUF chat template (%s); using %s", e, DEFAULT_TEMPLATE)
        return DEFAULT_TEMPLATE, []
    return fmt.template, fmt.stop

def standin_app(root: Path, *, threads: int | None = None) -> Starlette:
    """The ASGI app (Starlette) of a stand-in keeping its blobs and manifests under `root`; serve it with uvicorn."""
    s = Standin(Path(root), threads=threads)
    routes = [
        Route("/", s.root, methods=["GET", "HEAD"]),
        Route("/api/version", s.version, methods=["GET", "HEAD"]),
        Route("/api/blobs/{digest}", s.blob, methods=["HEAD", "POST"]),
        Route("/api/create", s.create, methods=["POST"]),
        Route("/api/tags", s.tags, methods=["GET"]),
        Route("/api/show", s.show, methods=["POST"]),
        Route("/api/chat", s.chat, methods=["POST"]),
        Route("/api/pull", s.pull, methods=["POST"]),
        Route("/api/delete", s.delete, methods=["DELETE"]),
        Route("/api/ps", s.ps, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={OllamaError: _ollama_error, HTTPException: _routing_error,
                                                        Exception: _bug})
    app.state.standin = s
    return app


# =========================================================================== serving


@contextlib.contextmanager
def serve_in_thread(root: Path, port: int = 0, host: str = "127.0.0.1") -> Iterator[str]:
    """Run the stand-in in a background thread (uvicorn); yield its base URL; stop it on exit."""
    import uvicorn

    config = uvicorn.Config(standin_app(Path(root)), host=host, port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="ollama-standin", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the Ollama stand-in did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devkit.ollama_standin",
                                     description="Ollama stand-in (CodeTune test double, NOT Ollama).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--dir", type=Path, required=True, help="where blobs and manifests are kept")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp CPU threads")
    args = parser.parse_args(argv)
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    log.info("%s on http://%s:%d, storage %s", BANNER, args.host, args.port, args.dir)
    uvicorn.run(standin_app(args.dir, threads=args.threads), host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
