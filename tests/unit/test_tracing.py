"""Tracing's setup (core/tracing.py): off costs nothing, console prints spans with the job's id, and what
arrives on the bus becomes an attribute only when it is a short printable id. The whole chain of a job on the
real stack is tests/stack/test_tracing_stack.py. Subprocesses: a tracer provider is global to its process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from core import tracing

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    import os

    penv = {**{k: v for k, v in os.environ.items() if not k.startswith("CODETUNE_")}, **env}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=penv, capture_output=True, text=True,
                          timeout=120, check=True)


def test_tracing_off_imports_no_sdk_and_adds_no_header() -> None:
    out = _run("import sys; from handlers.app import build_app; build_app(['datasets']); import infra.cli; "
               "from core import tracing; from events.client import CodeTuneClient; "
               "print(tracing.inject({}), tracing.enabled(), "
               "sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk', 'opentelemetry.trace', "
               "'opentelemetry.exporter', 'faststream.opentelemetry'))))")
    assert out.stdout.split() == ["{}", "False", "[]"]


def test_console_tracing_prints_spans_with_the_job_id_and_propagates_their_trace() -> None:
    code = ("from core import tracing; from core.settings import Settings; from handlers.app import build_app; "
            "app = build_app(['datasets'], Settings(_env_file=None)); "
            "print('middlewares', [getattr(m, '__name__', type(m).__name__) for m in app.broker.middlewares]); "
            "with_span = tracing.span('training', job_id='ftjob-1', step=3)\n"
            "with with_span:\n    print('headers', tracing.inject({})['traceparent'])\n"
            "tracing.flush()")
    out = _run(code, CODETUNE_TRACING="console").stdout
    assert "middlewares ['StructuredTraceContext', 'NatsTelemetryMiddleware']" in out
    traceparent = next(line.split()[1] for line in out.splitlines() if line.startswith("headers"))
    span = json.loads(out[out.index("{"):out.rindex("}") + 1])
    assert span["name"] == "training" and span["attributes"] == {"codetune.job_id": "ftjob-1", "codetune.step": 3}
    assert span["resource"]["attributes"]["service.name"] == "codetune-datasets"
    # the header a publish carries names this span: its trace id and its span id
    assert traceparent.startswith(f"00-{span['context']['trace_id'][2:]}-{span['context']['span_id'][2:]}-")


def test_only_short_printable_ids_from_a_message_become_attributes() -> None:
    body = {"job_id": "x" * 201, "dataset_id": "ds-1", "repo_id": "org/name\x1b[31m", "name": "not an id"}
    assert tracing.attributes(body) == {"codetune.dataset_id": "ds-1"}
    assert tracing.attributes({"job_id": 7, "dataset_id": ""}) == {}
