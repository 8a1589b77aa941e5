"""One trace per job (README "Tracing"): OpenTelemetry setup and the few helpers every process uses.

`CODETUNE_TRACING=off` (the default) imports nothing of OpenTelemetry: every helper here is a no-op that
checks one flag, so a light stage's cold start does not pay for tracing it does not use. `console` prints
finished spans on stdout; `otlp` sends them to `CODETUNE_OTLP_ENDPOINT` (OTLP over HTTP, batched). The SDK
and the exporter are the `codetune[telemetry]` extra, imported only here and only when tracing is on.

How a trace crosses the pipeline: a W3C `traceparent` header on every message. FastStream's
`NatsTelemetryMiddleware` (handlers/app.py) extracts it when a stage consumes a message and injects the
current span into what the handler publishes; the CLI, the bridge and any `CodeTuneClient` publish with
nats-py, so `inject` adds it there. A job is one trace because every event of it answers another one of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, SpanKind, Tracer

    from core.settings import Settings

TRACER_NAME = "codetune"
ID_ATTRIBUTES = ("job_id", "dataset_id", "repo_id")  # what a span is tagged with: `codetune.<name>`
_MAX_ID = 200

H = TypeVar("H", bound=MutableMapping[str, str])
_tracer: Tracer | None = None  # set once tracing is on in this process


def enabled() -> bool:
    return _tracer is not None


def configure(settings: Settings, service: str) -> bool:
    """Turn tracing on for this process as `settings.tracing` says (once; later calls change nothing).
    `service`: the resource's `service.name` (`codetune-tuning`, `codetune-bridge`, ...). True when on."""
    if _tracer is not None:
        return True
    if settings.tracing == "off":
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
    except ImportError as e:
        raise RuntimeError(f"CODETUNE_TRACING={settings.tracing} needs the telemetry extra: "
                           "pip install 'codetune[telemetry]'") from e

    exporter: SpanExporter
    if settings.tracing == "console":
        exporter = ConsoleSpanExporter(service_name=service)
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = settings.otlp_endpoint.rstrip("/")
        exporter = OTLPSpanExporter(endpoint=endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces")
    provider = TracerProvider(resource=Resource.create({"service.name": service}))  # flushed at exit
    provider.add_span_processor(BatchSpanProcessor(exporter))
    use(provider)
    return True


def use(provider: TracerProvider) -> None:
    """Trace with this provider (what `configure` builds; a program or a test may bring its own)."""
    global _tracer
    from opentelemetry import trace

    trace.set_tracer_provider(provider)  # FastStream's middleware takes the global one
    _tracer = provider.get_tracer(TRACER_NAME)


def flush(timeout_s: float = 5.0) -> None:
    """Export what is buffered now (a worker stopping, a short-lived CLI command ending)."""
    if _tracer is None:
        return
    from opentelemetry import trace

    force = getattr(trace.get_tracer_provider(), "force_flush", None)
    if force is not None:
        force(int(timeout_s * 1000))


def inject(headers: H) -> H:
    """Add the current span's `traceparent` (and `tracestate`) to `headers`; unchanged when tracing is off."""
    if _tracer is not None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        TraceContextTextMapPropagator().inject(headers)
    return headers


def traceparent() -> str | None:
    """The current span as a `traceparent` value (to record with a job), or None (no span, tracing off)."""
    if _tracer is None:
        return None
    headers: dict[str, str] = {}
    return inject(headers).get("traceparent")


@contextlib.contextmanager
def resumed(recorded: str | None, **ids: Any) -> Iterator[None]:
    """Back in a job's own trace (`recorded`: its `traceparent`) for what is done for the job in answer to a
    message of another trace (the dataset it waited for, validated for an upload of someone else's): a
    `job resumed` span there, linked to the current span. The current trace goes on when none was recorded."""
    parent = extract({"traceparent": recorded}) if recorded and _tracer is not None else None
    if _tracer is None or parent is None:
        yield
        return
    from opentelemetry.trace import Link, get_current_span

    here = get_current_span().get_span_context()
    with _tracer.start_as_current_span("job resumed", context=parent, links=[Link(here)] if here.is_valid else None,
                                       attributes=attributes(ids)):
        yield


def extract(headers: Mapping[str, str]) -> Context | None:
    """The trace context a caller sent (`traceparent`), or None (none sent, or tracing off)."""
    if _tracer is None:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    found = TraceContextTextMapPropagator().extract(headers)
    return found if len(found) else None


def _valid(value: Any) -> bool:
    """An id worth an attribute: a short printable string (what arrives on the bus is not trusted)."""
    return isinstance(value, str) and 0 < len(value) <= _MAX_ID and value.isprintable()


def attributes(ids: Mapping[str, Any]) -> dict[str, Any]:
    """`codetune.<name>` attributes for the ids in `ids` (job_id, dataset_id, repo_id) that are valid."""
    return {f"codetune.{k}": ids[k] for k in ID_ATTRIBUTES if _valid(ids.get(k))}


def tag(data: Any) -> None:
    """Tag the current span (a stage's `... process` span) with the ids a message body names."""
    if _tracer is None or not isinstance(data, dict):
        return
    found = attributes(data)
    if found:
        from opentelemetry import trace

        trace.get_current_span().set_attributes(found)


@contextlib.contextmanager
def span(name: str, *, context: Context | None = None, kind: SpanKind | None = None, **attrs: Any
         ) -> Iterator[Span | None]:
    """A span around a block (training, a checkpoint upload, an export, an Ollama create), a child of the
    current one (or of `context`); `job_id=`/`dataset_id=`/`repo_id=` become `codetune.*` attributes, other
    keywords `codetune.<key>`. Yields None when tracing is off."""
    if _tracer is None:
        yield None
        return
    extra = {f"codetune.{k}": v for k, v in attrs.items() if k not in ID_ATTRIBUTES and v is not None}
    from opentelemetry.trace import SpanKind

    with _tracer.start_as_current_span(name, context=context, kind=kind or SpanKind.INTERNAL,
                                       attributes={**attributes(attrs), **extra}) as sp:
        yield sp
