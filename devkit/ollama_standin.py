"""An Ollama STAND-IN for tests and offline development — NOT Ollama.

No Ollama server can be installed from the registries these machines reach, so tests that need an Ollama
endpoint use this small ASGI app instead. It implements the documented Ollama HTTP API endpoints that
CodeTune uses and validates requests the way Ollama documents them:

- `HEAD/POST /api/blobs/:digest` — digest `sha256:<hex>`; the body's SHA-256 must match (400 otherwise).
- `POST /api/create` — `model` required; `files`/`adapters` must name uploaded blobs (400 naming the
  missing digest); GGUF only; `template` must parse; NDJSON status stream ending in `{"status":"success"}`
  (one JSON object when `stream` is false). `quantize` is validated and recorded, but the stand-in has no
  quantizer: the weights are served as uploaded (the status stream says so).
- `GET /api/tags`, `POST /api/show`, `DELETE /api/delete`, `GET /api/ps`, `GET /api/version`.
- `POST /api/pull` — only "pulls" models it already has; others get Ollama's 404-style error.
- `POST /api/chat` — REAL llama.cpp inference (xllamacpp, in process) over the uploaded GGUF + LoRA
  adapter, with the prompt rendered from the model's TEMPLATE by `handlers.export.modelfile.GoTemplate`
  (Ollama's rules: SYSTEM prepended, same-role messages collated) and stopping at its `stop` parameters.
  Options `num_predict`, `temperature`, `seed`, `top_k`, `top_p`, `min_p`, `repeat_penalty`, `num_ctx`
  are honoured. Unlike Ollama (temperature 0.8) sampling is GREEDY unless a temperature is given.

Storage: `<dir>/blobs/sha256-<hex>` and `<dir>/manifests/<name>.json`.

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
import os
import re
import struct
import tempfile
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from handlers.ollama_format.chat_format import chat_format_from_jinja
from handlers.ollama_format.gotemplate import GoTemplate, TemplateError
from handlers.ollama_format.modelfile import render_modelfile

log = logging.getLogger("codetune.ollama_standin")

STANDIN_VERSION = "0.13.0-codetune-standin"
BANNER = "Ollama stand-in is running (CodeTune test double, NOT Ollama)"
DEFAULT_TEMPLATE = "{{ .Prompt }}"
DEFAULT_NUM_CTX = 4096
QUANTIZE_TYPES = ("Q4_K_M", "Q4_K_S", "Q8_0")  # what Ollama documents for create(quantize=…)

_DIGEST_RE = re.compile(r"^sha256[:-]([0-9a-f]{64})$")
_NAME_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/){0,2}[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
                      r"(?::[A-Za-z0-9_][A-Za-z0-9._-]{0,127})?$")

_INT_OPTS = {"num_ctx", "num_predict", "top_k", "seed", "repeat_last_n", "num_keep", "mirostat", "num_batch",
             "num_gpu", "main_gpu", "num_thread"}
_FLOAT_OPTS = {"temperature", "top_p", "min_p", "typical_p", "repeat_penalty", "presence_penalty",
               "frequency_penalty", "mirostat_tau", "mirostat_eta"}
_BOOL_OPTS = {"use_mmap", "numa", "penalize_newline", "low_vram", "vocab_only", "use_mlock", "f16_kv"}
_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
               11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
               17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


# =========================================================================== GGUF metadata


@dataclass
class GGUFInfo:
    kv: dict[str, Any]
    n_params: int

    @property
    def file_type(self) -> str:
        ft = self.kv.get("general.file_type")
        return _FILE_TYPES.get(ft, f"unknown({ft})") if ft is not None else "unknown"

    @property
    def architecture(self) -> str:
        return str(self.kv.get("general.architecture", ""))

    @property
    def is_adapter(self) -> bool:
        return self.kv.get("general.type") == "adapter"

    def token(self, key: str) -> str | None:
        tokens, tid = self.kv.get("tokenizer.ggml.tokens"), self.kv.get(key)
        return tokens[tid] if isinstance(tokens, list) and isinstance(tid, int) and tid < len(tokens) else None


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_gguf_info(path: Path) -> GGUFInfo:
    """Header key/values and parameter count of a GGUF file (stdlib only; tensor data is not read)."""
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        _version, n_tensors, n_kv = struct.unpack("<IQQ", f.read(20))
        kv = {}
        for _ in range(n_kv):
            key = _read_str(f)
            kv[key] = _read_value(f, struct.unpack("<I", f.read(4))[0])
        n_params = _count_params(f, n_tensors)
    return GGUFInfo(kv, n_params)


def _count_params(f: BinaryIO, n_tensors: int) -> int:
    total = 0
    for _ in range(n_tensors):
        _read_str(f)
        (n_dims,) = struct.unpack("<I", f.read(4))
        count = 1
        for d in struct.unpack(f"<{n_dims}Q", f.read(8 * n_dims)):
            count *= d
        f.read(12)  # type u32 + offset u64
        total += count
    return total


_MAX_LEN = 1 << 28  # a string or array longer than this is a corrupt header, not a model


def _read_str(f: BinaryIO) -> str:
    (n,) = struct.unpack("<Q", f.read(8))
    if n > _MAX_LEN:
        raise ValueError(f"corrupt GGUF header (string of {n} bytes)")
    return f.read(n).decode("utf-8", errors="replace")


def _read_value(f: BinaryIO, vtype: int) -> Any:
    if vtype == 8:
        return _read_str(f)
    if vtype == 9:
        (etype,), (count,) = struct.unpack("<I", f.read(4)), struct.unpack("<Q", f.read(8))
        if count > _MAX_LEN:
            raise ValueError(f"corrupt GGUF header (array of {count} values)")
        if etype in _SCALARS:
            size = struct.calcsize(_SCALARS[etype])
            return list(struct.unpack(f"<{count}{_SCALARS[etype][1]}", f.read(size * count)))
        return [_read_value(f, etype) for _ in range(count)]
    fmt = _SCALARS.get(vtype)
    if fmt is None:
        raise ValueError(f"unknown GGUF value type {vtype}")
    return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def _human_number(n: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}".rstrip("0").rstrip(".") + suffix
    return str(n)


# =========================================================================== storage


@dataclass
class ModelRecord:
    name: str  # normalised: "name:tag"
    files: dict[str, str]
    adapters: dict[str, str]
    template: str
    system: str
    parameters: dict[str, Any]
    details: dict[str, Any]
    model_info: dict[str, Any]
    size: int
    created_at: str
    quantize_requested: str | None = None
    digest: str = ""

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.name, "modified_at": self.created_at, "size": self.size,
                "digest": self.digest, "details": self.details}


class Store:
    """Blobs (content-addressed) and model manifests under one folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.manifests = self.root / "manifests"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.manifests.mkdir(parents=True, exist_ok=True)

    def blob_path(self, digest: str) -> Path:
        m = _DIGEST_RE.match(digest)
        if not m:
            raise HTTPError(400, f"invalid digest format {digest!r} (want sha256:<64 hex>)")
        return self.blobs / f"sha256-{m.group(1)}"

    async def write_blob(self, digest: str, chunks: AsyncIterator[bytes]) -> bool:
        """Store a blob after checking its SHA-256; False when it already existed (body discarded)."""
        path = self.blob_path(digest)
        h = hashlib.sha256()
        fd, tmp_name = tempfile.mkstemp(prefix=".upload-", dir=self.blobs)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in chunks:
                    h.update(chunk)
                    out.write(chunk)
            got = f"sha256:{h.hexdigest()}"
            if got != f"sha256:{path.name.removeprefix('sha256-')}":
                raise HTTPError(400, f"digest mismatch, expected \"{digest}\", got \"{got}\"")
            if path.exists():
                return False
            os.replace(tmp, path)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _manifest(self, name: str) -> Path:
        return self.manifests / (urllib.parse.quote(name.lower(), safe="") + ".json")

    def get(self, name: str) -> ModelRecord | None:
        path = self._manifest(normalize_name(name))
        if not path.is_file():
            return None
        return ModelRecord(**json.loads(path.read_text()))

    def put(self, record: ModelRecord) -> None:
        body = asdict(record)
        body["digest"] = ""
        record.digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        path = self._manifest(record.name)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(record), indent=2))
        os.replace(tmp, path)

    def delete(self, name: str) -> bool:
        path = self._manifest(normalize_name(name))
        if not path.is_file():
            return False
        path.unlink()
        self._prune()
        return True

    def all(self) -> list[ModelRecord]:
        return [ModelRecord(**json.loads(p.read_text())) for p in sorted(self.manifests.glob("*.json"))]

    def _prune(self) -> None:
        used = {d for r in self.all() for d in (*r.files.values(), *r.adapters.values())}
        for blob in self.blobs.glob("sha256-*"):
            if "sha256:" + blob.name.removeprefix("sha256-") not in used:
                blob.unlink(missing_ok=True)


def normalize_name(name: str) -> str:
    """Ollama names: `model` means `model:latest`; matching is case-insensitive."""
    name = name.strip()
    last = name.rsplit("/", 1)[-1]
    return (name if ":" in last else f"{name}:latest").lower()


# =========================================================================== inference (xllamacpp)


class Engine:
    """Loaded llama.cpp servers (one per model + context size), most recent first, at most `keep`."""

    def __init__(self, threads: int | None = None, keep: int = 2) -> None:
        self.threads = threads or max(1, min(4, os.cpu_count() or 1))
        self.keep = keep
        self._servers: OrderedDict[tuple[str, str, int], Any] = OrderedDict()
        self._lock = threading.Lock()

    def server(self, record: ModelRecord, store: Store, n_ctx: int) -> Any:
        key = (record.name, record.digest, n_ctx)
        with self._lock:
            if key in self._servers:
                self._servers.move_to_end(key)
                return self._servers[key]
            server = self._load(record, store, n_ctx)
            self._servers[key] = server
            while len(self._servers) > self.keep:
                self._servers.popitem(last=False)
            return server

    def _load(self, record: ModelRecord, store: Store, n_ctx: int) -> Any:
        try:
            import xllamacpp as xlc
        except ImportError as e:
            raise HTTPError(500, "the stand-in needs xllamacpp for inference (pip install xllamacpp)") from e
        params = xlc.CommonParams()
        params.model.path = str(store.blob_path(next(iter(record.files.values()))))
        params.n_ctx = n_ctx
        params.n_parallel = 1
        params.cpuparams.n_threads = self.threads
        params.cpuparams_batch.n_threads = self.threads
        params.warmup = False
        params.ctx_shift = False
        params.verbosity = -1
        params.lora_adapters = [xlc.CommonAdapterLoraInfo(str(store.blob_path(d)), 1.0)
                                for d in record.adapters.values()]
        try:
            return xlc.Server(params)
        except Exception as e:  # llama.cpp reports load failures as generic runtime errors
            raise HTTPError(500, f"llama runner process has terminated: {e}") from e

    def unload(self, name: str) -> None:
        with self._lock:
            for key in [k for k in self._servers if k[0] == name]:
                del self._servers[key]

    def loaded(self) -> list[str]:
        with self._lock:
            return [k[0] for k in self._servers]


def completion_request(prompt: str, opts: dict[str, Any], stream: bool, fmt: Any) -> dict[str, Any]:
    """A llama.cpp /v1/completions request from Ollama options (greedy unless a temperature is set)."""
    req: dict[str, Any] = {
        "prompt": prompt,
        "max_tokens": int(opts.get("num_predict", -1)),
        "temperature": float(opts.get("temperature", 0.0)),
        "stop": list(opts.get("stop", [])),
        "stream": stream,
        "cache_prompt": True,
    }
    for ours, theirs in (("seed", "seed"), ("top_k", "top_k"), ("top_p", "top_p"), ("min_p", "min_p"),
                         ("repeat_penalty", "repeat_penalty"), ("repeat_last_n", "repeat_last_n"),
                         ("presence_penalty", "presence_penalty"), ("frequency_penalty", "frequency_penalty"),
                         ("typical_p", "typical_p"), ("num_keep", "n_keep")):
        if ours in opts:
            req[theirs] = opts[ours]
    if fmt == "json":
        req["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        req["json_schema"] = fmt
    return req


# =========================================================================== options


def check_options(options: Any, *, strict: bool) -> dict[str, Any]:
    """Type-check Ollama options; unknown names are an error when `strict` (create), ignored otherwise."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise HTTPError(400, "options must be an object")
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key == "stop":
            stops = [value] if isinstance(value, str) else value
            if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
                raise HTTPError(400, 'option "stop" must be of type array of strings')
            out[key] = stops
        elif key in _INT_OPTS:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
                raise HTTPError(400, f'option "{key}" must be of type integer')
            out[key] = int(value)
        elif key in _FLOAT_OPTS:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise HTTPError(400, f'option "{key}" must be of type float')
            out[key] = float(value)
        elif key in _BOOL_OPTS:
            if not isinstance(value, bool):
                raise HTTPError(400, f'option "{key}" must be of type boolean')
            out[key] = value
        elif strict:
            raise HTTPError(400, f"unknown parameter '{key}'")
        else:
            log.warning("invalid option provided: %s", key)
    return out


# =========================================================================== HTTP plumbing


@dataclass
class Request:
    method: str
    path: str
    receive: Callable[[], Awaitable[dict[str, Any]]]
    _body: bytes | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise HTTPError(400, "client disconnected during upload")
            if message.get("body"):
                yield message["body"]
            if not message.get("more_body"):
                return

    async def json(self) -> dict[str, Any]:
        if self._body is None:
            self._body = b"".join([c async for c in self.chunks()])
        if not self._body.strip():
            raise HTTPError(400, "missing request body")
        try:
            data = json.loads(self._body)
        except json.JSONDecodeError as e:
            raise HTTPError(400, f"invalid JSON body: {e}") from e
        if not isinstance(data, dict):
            raise HTTPError(400, "request body must be a JSON object")
        return data


@dataclass
class Response:
    status: int = 200
    body: bytes | AsyncIterator[bytes] = b""
    content_type: str = "application/json; charset=utf-8"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    async def send(self, send: Callable[[dict[str, Any]], Awaitable[None]], *, head: bool = False) -> None:
        headers = [(b"content-type", self.content_type.encode()), *self.headers]
        if isinstance(self.body, bytes):
            headers.append((b"content-length", str(len(self.body)).encode()))
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        if isinstance(self.body, bytes):
            await send({"type": "http.response.body", "body": b"" if head else self.body})
            return
        async for chunk in self.body:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(obj, ensure_ascii=False).encode())


def ndjson_response(items: AsyncIterator[dict[str, Any]]) -> Response:
    async def lines() -> AsyncIterator[bytes]:
        try:
            async for item in items:
                yield json.dumps(item, ensure_ascii=False).encode() + b"\n"
        except HTTPError as e:  # after the headers went out, Ollama reports errors as a stream line
            yield json.dumps({"error": e.message}).encode() + b"\n"

    return Response(200, lines(), "application/x-ndjson")


async def _one(items: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    last: dict[str, Any] = {}
    async for item in items:
        last = item
    return last


# =========================================================================== the app


class StandinApp:
    """The ASGI application. `StandinApp(dir)`; serve with uvicorn."""

    def __init__(self, root: Path, *, threads: int | None = None) -> None:
        self.store = Store(root)
        self.engine = Engine(threads)
        self.routes: dict[tuple[str, str], Callable[[Request], Awaitable[Response]]] = {
            ("GET", "/"): self.root, ("HEAD", "/"): self.root,
            ("GET", "/api/version"): self.version, ("HEAD", "/api/version"): self.version,
            ("POST", "/api/create"): self.create, ("GET", "/api/tags"): self.tags,
            ("POST", "/api/show"): self.show, ("POST", "/api/chat"): self.chat,
            ("POST", "/api/pull"): self.pull, ("DELETE", "/api/delete"): self.delete,
            ("GET", "/api/ps"): self.ps,
        }

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        request = Request(scope["method"], scope["path"], receive)
        try:
            response = await self._dispatch(request)
        except HTTPError as e:
            response = json_response({"error": e.message}, e.status)
        except Exception as e:  # a bug in the stand-in: answer like Ollama does, with a 500
            log.exception("stand-in error on %s %s", request.method, request.path)
            response = json_response({"error": f"{type(e).__name__}: {e}"}, 500)
        await response.send(send, head=request.method == "HEAD")

    @staticmethod
    async def _lifespan(receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _dispatch(self, request: Request) -> Response:
        if request.path.startswith("/api/blobs/"):
            digest = request.path.removeprefix("/api/blobs/")
            if request.method == "HEAD":
                return Response(200 if self.store.blob_path(digest).is_file() else 404)
            if request.method == "POST":
                return await self.upload(request, digest)
            return Response(405, b"405 method not allowed", "text/plain")
        handler = self.routes.get((request.method, request.path))
        if handler is None:
            known = any(path == request.path for _, path in self.routes)
            return Response(405 if known else 404, b"405 method not allowed" if known else b"404 page not found",
                            "text/plain")
        return await handler(request)

    # ----------------------------------------------------------------- simple endpoints

    async def root(self, _: Request) -> Response:
        return Response(200, BANNER.encode(), "text/plain; charset=utf-8")

    async def version(self, _: Request) -> Response:
        return json_response({"version": STANDIN_VERSION, "standin": BANNER})

    async def upload(self, request: Request, digest: str) -> Response:
        created = await self.store.write_blob(digest, request.chunks())
        return Response(201 if created else 200)

    async def tags(self, _: Request) -> Response:
        models = sorted(self.store.all(), key=lambda r: r.created_at, reverse=True)
        return json_response({"models": [r.public() for r in models]})

    async def ps(self, _: Request) -> Response:
        loaded = [r.public() for name in self.engine.loaded() if (r := self.store.get(name))]
        return json_response({"models": loaded})

    async def delete(self, request: Request) -> Response:
        body = await request.json()
        name = _model_field(body)
        if not self.store.delete(name):
            raise HTTPError(404, f"model '{name}' not found")
        self.engine.unload(normalize_name(name))
        return Response(200)

    async def pull(self, request: Request) -> Response:
        body = await request.json()
        name = _model_field(body)
        record = self.store.get(name)
        if record is None:
            raise HTTPError(404, "pull model manifest: file does not exist")

        async def statuses() -> AsyncIterator[dict[str, Any]]:
            yield {"status": "pulling manifest"}
            for digest in (*record.files.values(), *record.adapters.values()):
                size = self.store.blob_path(digest).stat().st_size
                yield {"status": f"pulling {digest.removeprefix('sha256:')[:12]}", "digest": digest,
                       "total": size, "completed": size}
            yield {"status": "verifying sha256 digest"}
            yield {"status": "writing manifest"}
            yield {"status": "success"}

        return await _maybe_stream(body, statuses())

    async def show(self, request: Request) -> Response:
        body = await request.json()
        name = _model_field(body)
        record = self.store.get(name)
        if record is None:
            raise HTTPError(404, f"model '{name}' not found")
        stop = record.parameters.get("stop", [])
        others = {k: v for k, v in record.parameters.items() if k != "stop"}
        modelfile = "# Modelfile generated by the CodeTune Ollama stand-in (not Ollama)\n" + render_modelfile(
            str(self.store.blob_path(next(iter(record.files.values())))),
            str(self.store.blob_path(next(iter(record.adapters.values())))) if record.adapters else None,
            record.template, stop, record.system or None, others)
        params = "\n".join(f"{k:<30} {json.dumps(v) if isinstance(v, str) else v}"
                           for k, vs in record.parameters.items() for v in (vs if isinstance(vs, list) else [vs]))
        return json_response({
            "license": "", "modelfile": modelfile, "parameters": params, "template": record.template,
            "system": record.system, "details": record.details, "model_info": record.model_info,
            "capabilities": ["completion"], "modified_at": record.created_at,
        })

    # ----------------------------------------------------------------- create

    async def create(self, request: Request) -> Response:
        body = await request.json()
        plan = self._plan_create(body)
        return await _maybe_stream(body, self._create_stream(plan))

    def _plan_create(self, body: dict[str, Any]) -> dict[str, Any]:
        raw_name = body.get("model") or body.get("name")
        if not raw_name or not isinstance(raw_name, str):
            raise HTTPError(400, "model is required")
        if not _NAME_RE.match(raw_name):
            raise HTTPError(400, "invalid model name")
        files, adapters = self._files(body, "files"), self._files(body, "adapters")
        base = None
        if body.get("from"):
            base = self.store.get(str(body["from"]))
            if base is None:
                raise HTTPError(404, f"model '{body['from']}' not found")
            files = files or dict(base.files)
            adapters = adapters or dict(base.adapters)
        elif not files:
            raise HTTPError(400, "neither 'from' or 'files' was specified")
        if len(adapters) > 1:
            raise HTTPError(400, "only one adapter is currently supported")
        infos = {d: self._gguf(d, name) for name, d in {**files, **adapters}.items()}
        model_digest = next(iter(files.values()))
        if infos[model_digest].is_adapter:
            raise HTTPError(400, f"{next(iter(files))} is a LoRA adapter GGUF; pass it in 'adapters'")
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
            raise HTTPError(400, f"template error: {e}") from e
        return {"name": normalize_name(raw_name), "files": files, "adapters": adapters, "infos": infos,
                "template": str(template), "system": str(body.get("system") or (base.system if base else "")),
                "parameters": params, "quantize": quantize}

    def _files(self, body: dict[str, Any], key: str) -> dict[str, str]:
        files = body.get(key) or {}
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise HTTPError(400, f"'{key}' must map file names to digests")
        for fname, digest in files.items():
            if fname.startswith("/") or ".." in Path(fname).parts:
                raise HTTPError(400, "file path must be relative")
            if not self.store.blob_path(digest).is_file():
                raise HTTPError(400, f"{key}: blob {digest} for {fname!r} not found; upload it first "
                                     f"(POST /api/blobs/{digest})")
        return dict(files)

    def _gguf(self, digest: str, fname: str) -> GGUFInfo:
        try:
            return read_gguf_info(self.store.blob_path(digest))
        except (ValueError, struct.error, OSError) as e:
            raise HTTPError(400, f"supplied file was not in GGUF format ({fname}: {e})") from e

    @staticmethod
    def _check_quantize(quantize: Any, info: GGUFInfo) -> str | None:
        if not quantize:
            return None
        q = str(quantize).upper()
        if q not in QUANTIZE_TYPES:
            raise HTTPError(400, f"unsupported quantization type {quantize}")
        if info.file_type not in ("F16", "F32"):
            raise HTTPError(400, "quantization is only supported for F16 and F32 models")
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
            created_at=_now(), quantize_requested=plan["quantize"]))
        yield {"status": "success"}

    # ----------------------------------------------------------------- chat

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        raw_name = body.get("model")
        if not raw_name or not isinstance(raw_name, str):
            raise HTTPError(400, "model is required")
        record = self.store.get(raw_name)
        if record is None:
            raise HTTPError(404, f'model "{raw_name}" not found, try pulling it first')
        messages = _check_messages(body.get("messages"))
        if body.get("tools"):
            raise HTTPError(400, f'"{raw_name}" does not support tools')
        if body.get("think") is True:
            raise HTTPError(400, f'"{raw_name}" does not support thinking')
        opts = {**record.parameters, **check_options(body.get("options"), strict=False)}
        if not messages:
            done = "unload" if body.get("keep_alive") in (0, "0", "0s") else "load"
            if done == "unload":
                self.engine.unload(record.name)
            return json_response({"model": raw_name, "created_at": _now(),
                                  "message": {"role": "assistant", "content": ""}, "done_reason": done,
                                  "done": True})
        try:
            prompt = GoTemplate(record.template).render_chat(messages, record.system or None)
        except TemplateError as e:
            raise HTTPError(500, f"template: {e}") from e
        stream = body.get("stream", True) is not False
        req = completion_request(prompt, opts, stream, body.get("format"))
        n_ctx = int(opts.get("num_ctx", min(DEFAULT_NUM_CTX, record.model_info.get("context_length") or
                                            DEFAULT_NUM_CTX)))
        started = time.monotonic_ns()
        server = await asyncio.to_thread(self.engine.server, record, self.store, n_ctx)
        loaded = time.monotonic_ns()
        if not stream:
            result = await asyncio.to_thread(server.handle_completions, req)
            return json_response(_chat_final(raw_name, _completion(result), started, loaded))
        return ndjson_response(self._chat_stream(raw_name, server, req, started, loaded))

    async def _chat_stream(self, model: str, server: Any, req: dict[str, Any], started: int,
                           loaded: int) -> AsyncIterator[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[dict[str, Any] | BaseException | None] = asyncio.Queue()
        cancelled = threading.Event()

        def on_chunk(chunk: dict[str, Any]) -> bool:
            loop.call_soon_threadsafe(queue.put_nowait, chunk)
            return cancelled.is_set()

        def work() -> None:
            try:
                result = server.handle_completions(req, on_chunk)
                if isinstance(result, dict) and result.get("error"):
                    loop.call_soon_threadsafe(queue.put_nowait, RuntimeError(_error_text(result)))
            except Exception as e:  # reported to the client as an error line
                loop.call_soon_threadsafe(queue.put_nowait, e)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        worker = loop.run_in_executor(None, work)
        final: dict[str, Any] = {}
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise HTTPError(500, str(item))
                choice = (item.get("choices") or [{}])[0]
                if choice.get("text"):
                    yield {"model": model, "created_at": _now(),
                           "message": {"role": "assistant", "content": choice["text"]}, "done": False}
                if choice.get("finish_reason") or item.get("usage"):
                    final = item
            yield _chat_final(model, {**_completion(final), "text": ""}, started, loaded)
        finally:
            cancelled.set()
            await worker


def _completion(result: Any) -> dict[str, Any]:
    if not isinstance(result, dict) or result.get("error") or "choices" not in result:
        raise HTTPError(500, _error_text(result))
    choice = result["choices"][0] if result["choices"] else {}
    usage, timings = result.get("usage") or {}, result.get("timings") or {}
    return {"text": choice.get("text") or "", "finish_reason": choice.get("finish_reason") or "stop",
            "prompt_tokens": usage.get("prompt_tokens", 0), "completion_tokens": usage.get("completion_tokens", 0),
            "prompt_ms": timings.get("prompt_ms", 0.0), "predicted_ms": timings.get("predicted_ms", 0.0)}


def _error_text(result: Any) -> str:
    if isinstance(result, dict) and isinstance(result.get("error"), dict):
        return str(result["error"].get("message") or result["error"])
    return f"llama.cpp returned no completion: {str(result)[:300]}"


def _chat_final(model: str, c: dict[str, Any], started: int, loaded: int) -> dict[str, Any]:
    return {
        "model": model, "created_at": _now(), "message": {"role": "assistant", "content": c["text"]},
        "done_reason": "length" if c["finish_reason"] == "length" else "stop", "done": True,
        "total_duration": time.monotonic_ns() - started, "load_duration": loaded - started,
        "prompt_eval_count": c["prompt_tokens"], "prompt_eval_duration": int(c["prompt_ms"] * 1e6),
        "eval_count": c["completion_tokens"], "eval_duration": int(c["predicted_ms"] * 1e6),
    }


async def _maybe_stream(body: dict[str, Any], items: AsyncIterator[dict[str, Any]]) -> Response:
    if body.get("stream", True) is False:
        return json_response(await _one(items))
    return ndjson_response(items)


def _model_field(body: dict[str, Any]) -> str:
    name = body.get("model") or body.get("name")
    if not name or not isinstance(name, str):
        raise HTTPError(400, "model is required")
    return name


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if messages is None:
        return []
    if not isinstance(messages, list):
        raise HTTPError(400, "messages must be an array")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise HTTPError(400, f"messages[{i}]: each message needs a string 'role'")
        if not isinstance(m.get("content", ""), str):
            raise HTTPError(400, f"messages[{i}]: 'content' must be a string")
    return messages


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


# =========================================================================== serving


@contextlib.contextmanager
def serve_in_thread(root: Path, port: int = 0, host: str = "127.0.0.1") -> Iterator[str]:
    """Run the stand-in in a background thread (uvicorn); yield its base URL; stop it on exit."""
    import uvicorn

    config = uvicorn.Config(StandinApp(Path(root)), host=host, port=port, log_level="warning", lifespan="on")
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
    uvicorn.run(StandinApp(args.dir, threads=args.threads), host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
