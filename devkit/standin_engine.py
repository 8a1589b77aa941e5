"""The Ollama stand-in's inference: llama.cpp (xllamacpp, in process) servers per model, Ollama options
checked and mapped onto llama.cpp completion requests, and completion results as Ollama chat answers."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from devkit.standin_store import ModelRecord, OllamaError, Store, now

log = logging.getLogger("codetune.ollama_standin")

_INT_OPTS = {"num_ctx", "num_predict", "top_k", "seed", "repeat_last_n", "num_keep", "mirostat", "num_batch",
             "num_gpu", "main_gpu", "num_thread"}
_FLOAT_OPTS = {"temperature", "top_p", "min_p", "typical_p", "repeat_penalty", "presence_penalty",
               "frequency_penalty", "mirostat_tau", "mirostat_eta"}
_BOOL_OPTS = {"use_mmap", "numa", "penalize_newline", "low_vram", "vocab_only", "use_mlock", "f16_kv"}


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
            raise OllamaError(500, "the stand-in needs xllamacpp for inference (pip install xllamacpp)") from e
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
            raise OllamaError(500, f"llama runner process has terminated: {e}") from e

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
        raise OllamaError(400, "options must be an object")
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key == "stop":
            stops = [value] if isinstance(value, str) else value
            if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
                raise OllamaError(400, 'option "stop" must be of type array of strings')
            out[key] = stops
        elif key in _INT_OPTS:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
                raise OllamaError(400, f'option "{key}" must be of type integer')
            out[key] = int(value)
        elif key in _FLOAT_OPTS:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise OllamaError(400, f'option "{key}" must be of type float')
            out[key] = float(value)
        elif key in _BOOL_OPTS:
            if not isinstance(value, bool):
                raise OllamaError(400, f'option "{key}" must be of type boolean')
            out[key] = value
        elif strict:
            raise OllamaError(400, f"unknown parameter '{key}'")
        else:
            log.warning("invalid option provided: %s", key)
    return out




def completion(result: Any) -> dict[str, Any]:
    if not isinstance(result, dict) or result.get("error") or "choices" not in result:
        raise OllamaError(500, _error_text(result))
    choice = result["choices"][0] if result["choices"] else {}
    usage, timings = result.get("usage") or {}, result.get("timings") or {}
    return {"text": choice.get("text") or "", "finish_reason": choice.get("finish_reason") or "stop",
            "prompt_tokens": usage.get("prompt_tokens", 0), "completion_tokens": usage.get("completion_tokens", 0),
            "prompt_ms": timings.get("prompt_ms", 0.0), "predicted_ms": timings.get("predicted_ms", 0.0)}


def _error_text(result: Any) -> str:
    if isinstance(result, dict) and isinstance(result.get("error"), dict):
        return str(result["error"].get("message") or result["error"])
    return f"llama.cpp returned no completion: {str(result)[:300]}"


def chat_final(model: str, c: dict[str, Any], started: int, loaded: int) -> dict[str, Any]:
    return {
        "model": model, "created_at": now(), "message": {"role": "assistant", "content": c["text"]},
        "done_reason": "length" if c["finish_reason"] == "length" else "stop", "done": True,
        "total_duration": time.monotonic_ns() - started, "load_duration": loaded - started,
        "prompt_eval_count": c["prompt_tokens"], "prompt_eval_duration": int(c["prompt_ms"] * 1e6),
        "eval_count": c["completion_tokens"], "eval_duration": int(c["predicted_ms"] * 1e6),
    }




async def chat_stream(model: str, server: Any, req: dict[str, Any], started: int,
                      loaded: int) -> AsyncIterator[dict[str, Any]]:
    """Ollama's streamed chat answer: one line per llama.cpp chunk, then the final line with the counts.
    The completion runs in a worker thread; leaving early (the client went away) cancels it."""
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
                raise OllamaError(500, str(item))
            choice = (item.get("choices") or [{}])[0]
            if choice.get("text"):
                yield {"model": model, "created_at": now(),
                       "message": {"role": "assistant", "content": choice["text"]}, "done": False}
            if choice.get("finish_reason") or item.get("usage"):
                final = item
        yield chat_final(model, {**completion(final), "text": ""}, started, loaded)
    finally:
        cancelled.set()
        await worker
