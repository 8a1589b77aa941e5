"""Errors in the shape the web client reads: `{"detail": "message"}`, or FastAPI's 422 list of field errors
`{"detail": [{"loc": [...], "msg": ..., "type": ...}]}`."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import nats.errors
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from core.errors import CodeTuneError, InvalidInputError, NotFoundError, TransientError
from handlers.bridge.receipts import IdempotencyConflict

log = logging.getLogger("codetune.bridge")


def field_errors(exc: ValidationError, prefix: Iterable[str | int] = ("body",),
                 rename: Mapping[tuple[str | int, ...], tuple[str | int, ...]] | None = None) -> list[dict[str, Any]]:
    """A pydantic error as FastAPI's 422 entries, located under `prefix` (with optional loc renames)."""
    out = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        for old, new in (rename or {}).items():
            if loc[: len(old)] == old:
                loc = new + loc[len(old):]
                break
        entry: dict[str, Any] = {"type": err["type"], "loc": [*prefix, *loc], "msg": err["msg"]}
        if "ctx" in err:
            entry["ctx"] = {k: v if isinstance(v, (str, int, float, bool)) else str(v) for k, v in err["ctx"].items()}
        out.append(entry)
    return out


def invalid(errors: list[dict[str, Any]]) -> RequestValidationError:
    return RequestValidationError(errors)


def invalid_field(loc: Iterable[str | int], msg: str, type_: str = "value_error") -> RequestValidationError:
    return RequestValidationError([{"type": type_, "loc": list(loc), "msg": msg}])


def _detail(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(IdempotencyConflict)
    async def _conflict(_: Request, exc: IdempotencyConflict) -> JSONResponse:
        return _detail(exc.status, exc.message, {"Retry-After": "1"} if exc.status == 409 else None)

    @app.exception_handler(CodeTuneError)
    async def _codetune(_: Request, exc: CodeTuneError) -> JSONResponse:
        status = (404 if isinstance(exc, NotFoundError) else 422 if isinstance(exc, InvalidInputError)
                  else 503 if isinstance(exc, TransientError) else 502)
        return _detail(status, exc.message)

    @app.exception_handler(nats.errors.Error)
    async def _nats(_: Request, exc: nats.errors.Error) -> JSONResponse:
        log.warning("NATS error: %r", exc)
        return _detail(503, f"event bus unavailable: {type(exc).__name__}")
