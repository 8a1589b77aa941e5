"""Every job proves itself: an evaluation report (base vs tuned on held-out rows, sample answers, the exported
GGUF in llama.cpp) and a quality gate before anything is published. Real stack, tiny Llama, real training.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from events import subjects as sj
from events.payloads import EvaluationReport, TuningRequested
from infra.flows import upload_dataset
from storage.documents import ServedModel, TuningJob
from tests.conftest import TINY_REPO
from tests.stack.test_bridge import AUTH, TOKEN, serve_bridge, wait_until
from tests.stack.test_cli import codetune

pytestmark = [pytest.mark.usefixtures("workers", "tuning_worker"), pytest.mark.slow]
END = [sj.MODEL_PUBLISHED, sj.MODEL_PUBLISH_FAILED, sj.MODEL_EXPORT_FAILED, sj.TUNING_FAILED]
LEARNS = {"max_steps": 16, "learning_rate": 3e-2, "eval_steps": 8, "save_steps": 8, "max_seq_len": 128}


@pytest.fixture(scope="module")
async def dataset_id(settings, tmp_path_factory) -> str:
    from devkit.tinymodel import toy_dataset

    path = toy_dataset(tmp_path_factory.mktemp("data") / "facts.jsonl", "chat", rows=32)
    _, answer = await upload_dataset(settings, path, "facts.jsonl", "auto", True, 30)
    return answer.dataset_id


@pytest.fixture(scope="module")
async def http(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[httpx.AsyncClient]:
    log = tmp_path_factory.mktemp("bridge-report") / "bridge.log"
    with serve_bridge(env, log, {"CODETUNE_BRIDGE_TOKEN": TOKEN}) as url:
        await wait_until(f"{url}/readyz")
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as c:
            yield c


def job(dataset_id: str, hp: dict[str, Any], **export: Any) -> TuningRequested:
    job_id = f"ftjob-{uuid.uuid4().hex[:12]}"
    return TuningRequested(job_id=job_id, base_model=TINY_REPO, dataset_id=dataset_id, name=f"eval-{job_id[6:]}",
                           hyperparameters=hp, export=export)


async def run(client, req: TuningRequested) -> dict[str, Any]:
    """Publish the job; collect its events (subject → payload) up to its last answer, in order."""
    seen: dict[str, Any] = {}
    order: list[str] = []
    async with client.subscribe([sj.TUNING_EVALUATED, sj.MODEL_EVALUATED, sj.MODEL_EXPORTED, *END]) as q:
        await client.publish(req)
        while not (set(order) & set(END)):
            subject, data = await client.wait_for(q, lambda _, d: d.get("job_id") == req.job_id, 300)
            seen[subject] = data
            order.append(subject)
    seen["order"] = order
    return seen


async def test_every_job_gets_a_report_and_a_model_that_learned_and_stops_is_published(
        client, store, dataset_id, env, http) -> None:
    req = job(dataset_id, LEARNS)
    ev = await run(client, req)
    assert ev["order"] == [sj.TUNING_EVALUATED, sj.MODEL_EVALUATED, sj.MODEL_EXPORTED, sj.MODEL_PUBLISHED], ev
    first, r = ev[sj.TUNING_EVALUATED].report, ev[sj.MODEL_EVALUATED].report
    assert first.runtime is None and first.gate is None  # tuning's part: base vs tuned, samples
    # base vs tuned on the same held-out rows: the tune learned its facts
    assert r.source == "validation" and r.rows == 3 and r.base.tokens == r.tuned.tokens > 0
    assert r.tuned.loss < r.base.loss * 0.9
    assert r.tuned.token_accuracy > r.base.token_accuracy
    assert len(r.samples) == 3 and all(s.reference and s.tuned for s in r.samples)
    assert any("capital" in s.tuned for s in r.samples)
    # the exported GGUF in llama.cpp answers, stops within the budget and agrees with transformers
    c = r.runtime
    assert c is not None and c.error is None and c.answer
    assert c.stopped and c.finish_reason == "stop" and 0 < c.tokens <= c.budget == 64
    assert c.compared_tokens > 0 and c.agree_tokens >= 1
    assert r.gate is not None and r.gate.enabled and r.gate.passed and not r.gate.reasons
    assert ev[sj.MODEL_EVALUATED].passed

    # stored with the job, and as JSON + Markdown next to the loss plot
    doc = await TuningJob.find_one(TuningJob.job_id == req.job_id)
    assert EvaluationReport.model_validate(doc.report) == r
    assert r.json_key == f"jobs/{req.job_id}/report.json" and r.markdown_key == f"jobs/{req.job_id}/report.md"
    assert doc.plot_key.rsplit("/", 1)[0] == r.json_key.rsplit("/", 1)[0]
    assert EvaluationReport.model_validate_json(await store.get_bytes(r.json_key)) == r
    card = (await store.get_bytes(r.markdown_key)).decode()
    assert "Quality gate: PASSED" in card and f"{r.base.loss:.4f}" in card and f"{r.tuned.loss:.4f}" in card
    assert "Exported GGUF in llama.cpp" in card and r.samples[0].prompt in card

    # served by the bridge; 404 for an unknown job and for a job with no report yet
    got = await http.get(f"/api/v1/tuning/{req.job_id}/report")
    assert got.status_code == 200 and EvaluationReport.model_validate(got.json()) == r
    md = await http.get(f"/api/v1/tuning/{req.job_id}/report", params={"format": "markdown"})
    assert md.status_code == 200 and md.text == card and md.headers["content-type"].startswith("text/markdown")
    assert (await http.get("/api/v1/tuning/ftjob-nosuchjob1/report")).status_code == 404
    bare = TuningJob(job_id=f"job-noreport-{uuid.uuid4().hex[:8]}", base_model=TINY_REPO, dataset_id="ds-none")
    await bare.insert()
    missing = await http.get(f"/api/v1/tuning/{bare.job_id}/report")
    assert missing.status_code == 404 and "no evaluation report" in missing.text

    # shown by `codetune job show`
    shown = await codetune(env, "job", "show", req.job_id)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "Evaluation report" in shown.stdout and "Quality gate: PASSED" in shown.stdout
    assert json.loads((await codetune(env, "job", "show", req.job_id, "--json")).stdout)["report"]["gate"]["passed"]


async def test_a_job_that_learned_nothing_is_stopped_by_the_gate_and_publishes_with_gate_false(
        client, dataset_id, settings, tmp_path: Path) -> None:
    barely = {"max_steps": 1, "learning_rate": 1e-6, "eval_steps": 1, "max_seq_len": 128}
    req = job(dataset_id, barely)
    ev = await run(client, req)
    assert ev["order"] == [sj.TUNING_EVALUATED, sj.MODEL_EVALUATED, sj.MODEL_EXPORT_FAILED], ev
    failed, r = ev[sj.MODEL_EXPORT_FAILED], ev[sj.MODEL_EVALUATED].report
    assert failed.error.code == "quality_gate" and "not below the base's" in failed.error.message
    assert not ev[sj.MODEL_EVALUATED].passed and r.gate.enabled and not r.gate.passed
    assert any("tuned eval loss" in why for why in r.gate.reasons)
    assert r.base.loss is not None and r.tuned.loss > r.base.loss * (1 - 0.02)
    doc = await TuningJob.find_one(TuningJob.job_id == req.job_id)
    assert doc.status == "succeeded" and doc.stage == "export_failed" and doc.error.code == "quality_gate"
    assert doc.report["gate"]["passed"] is False  # the report says why
    assert await ServedModel.find_one(ServedModel.name == req.name) is None  # nothing published
    names = [m.get("model") or m.get("name") for m in await client.request(sj.OLLAMA_MODELS, {})]
    assert not any(str(n).startswith(req.name) for n in names)

    # the same job opting out of the gate publishes; this one also names its own eval file
    from devkit.tinymodel import toy_dataset

    held = toy_dataset(tmp_path / "held.jsonl", "chat", rows=5, seed=7)
    _, eval_ds = await upload_dataset(settings, held, "held.jsonl", "auto", True, 30)
    opted_out = job(dataset_id, barely, gate=False).model_copy(update={"eval_dataset_id": eval_ds.dataset_id})
    ev = await run(client, opted_out)
    assert ev["order"][-1] == sj.MODEL_PUBLISHED, ev
    r = ev[sj.MODEL_EVALUATED].report
    assert r.source == "eval_file" and r.rows == 5 and r.samples[0].prompt in held.read_text()
    gate = r.gate
    assert not gate.enabled and not gate.passed and gate.reasons  # recorded, not enforced
    assert (await ServedModel.find_one(ServedModel.name == opted_out.name)).job_id == opted_out.job_id


async def test_the_gguf_check_fails_a_model_that_never_learned_to_stop(client, settings, tmp_path: Path) -> None:
    """Answers longer than max_seq_len are cut before their end-of-turn token, so the tune never sees one:
    its GGUF runs to the token budget, and the gate refuses it even though its loss fell."""
    from devkit.tinymodel import _fact_rows

    rows = [{"messages": [{"role": "user", "content": q},
                          {"role": "assistant", "content": " ".join([s] * 8)}]} for q, _, s in _fact_rows()]
    path = tmp_path / "rambling.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    _, answer = await upload_dataset(settings, path, "rambling.jsonl", "auto", True, 30)
    req = job(answer.dataset_id, {**LEARNS, "max_seq_len": 40})
    ev = await run(client, req)
    assert ev["order"] == [sj.TUNING_EVALUATED, sj.MODEL_EVALUATED, sj.MODEL_EXPORT_FAILED], ev
    r = ev[sj.MODEL_EVALUATED].report
    assert r.runtime is not None and not r.runtime.stopped and r.runtime.finish_reason == "length"
    assert r.runtime.tokens == r.runtime.budget
    assert any("did not stop within 64 tokens" in why for why in r.gate.reasons)
    assert "did not stop" in ev[sj.MODEL_EXPORT_FAILED].error.message


async def test_an_unknown_eval_dataset_fails_the_job_before_training(client, dataset_id) -> None:
    req = job(dataset_id, LEARNS).model_copy(update={"eval_dataset_id": "ds-no-such-eval"})
    async with client.subscribe([sj.TUNING_FAILED, sj.TUNING_COMPLETED]) as q:
        await client.publish(req)
        subject, failed = await client.wait_for(q, lambda _, d: d.get("job_id") == req.job_id, 60)
    assert subject == sj.TUNING_FAILED and failed.error.code == "dataset_not_found"
    assert "ds-no-such-eval" in failed.error.message
