"""`codetune pipeline`: upload → pull → tune → export → Ollama → one chat, watched stage by stage.

It replaces the seed's `scripts/hf_ollama_pipeline.py`, but drives the stages through events instead of
calling them: run it against workers anywhere (`codetune worker`), or let `codetune demo` run the stages
in-process. `--push ME/REPO` publishes `model.push.requested` and waits for the models stage's answer: the
HF token is the models stage's setting (environment), never an argument nor part of an event.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core import tracing
from core.settings import Settings
from events import subjects as sj
from events.ids import new_job_id
from events.payloads import (
    ExportOptions,
    Hyperparameters,
    ModelPullRequested,
    OllamaChatRequest,
    TuningRequested,
)
from infra.console import console
from infra.flows import (
    FlowError,
    client,
    dataset_failure,
    failure_hints,
    follow_job,
    print_report,
    pull_model,
    request_push,
    upload_dataset,
)


async def run_pipeline(settings: Settings, repo_id: str, dataset: Path, name: str, hp: Hyperparameters,
                       export: ExportOptions, prompt: str, push: str | None = None,
                       timeout: float = 24 * 3600) -> dict[str, Any]:
    """The whole run, with tracing on, is one trace (README "Tracing"): its root span is this command's."""
    job_id = new_job_id()
    with tracing.span("codetune pipeline", job_id=job_id, repo_id=repo_id):
        return await _run(settings, repo_id, dataset, name, hp, export, prompt, push, timeout, job_id)


async def _run(settings: Settings, repo_id: str, dataset: Path, name: str, hp: Hyperparameters,
               export: ExportOptions, prompt: str, push: str | None, timeout: float, job_id: str) -> dict[str, Any]:
    console.rule("[bold]1/5 dataset")
    uploaded = await upload_dataset(settings, dataset, None, "auto", True, 600)
    assert uploaded is not None
    if uploaded[0] != sj.DATASET_VALIDATED:
        raise dataset_failure(uploaded[1], dataset)
    dataset_id = uploaded[1].dataset_id

    async with client(settings) as c:
        console.rule("[bold]2/5 base model")
        await pull_model(c, ModelPullRequested(repo_id=repo_id), timeout)

        console.rule("[bold]3/5 fine-tune")
        job = TuningRequested(job_id=job_id, base_model=repo_id, dataset_id=dataset_id,
                              hyperparameters=hp, name=name, export=export)
        ends = [sj.MODEL_EXPORTED, sj.MODEL_EXPORT_FAILED, sj.MODEL_PUBLISHED, sj.MODEL_PUBLISH_FAILED]
        async with c.subscribe([sj.progress_subject(job.job_id), sj.TUNING_COMPLETED, sj.TUNING_FAILED,
                                sj.TUNING_CANCELLED, sj.MODEL_EVALUATED, *ends]) as q:
            await c.publish(job)
            console.print(f"job [bold]{job.job_id}[/bold]")
            done = await follow_job(c, q, job.job_id, timeout)  # a failure raises: reason, `job show`, dlq

            console.rule("[bold]4/5 export, evaluation report, quality gate, Ollama")
            subject, evaluated = await c.wait_for(
                q, lambda s, d: s in (sj.MODEL_EVALUATED, *ends) and d.get("job_id") == job.job_id, timeout)
            report = None
            if subject == sj.MODEL_EVALUATED:
                report = evaluated.report
                print_report(report)
                subject, exported = await c.wait_for(q, lambda s, d: s in ends and d.get("job_id") == job.job_id,
                                                     timeout)
            else:
                exported = evaluated
            if subject != sj.MODEL_EXPORTED:
                raise FlowError(f"job {job.job_id}: export failed: {exported.error.code}: {exported.error.message}",
                                failure_hints(exported.error, f"codetune job show {job.job_id}"))
            console.print(f"[green]exported[/green] {exported.mode}: {exported.model_key}"
                          + (f" + {exported.adapter_key}" if exported.adapter_key else "")
                          + f"; Modelfile {exported.modelfile_key}; stop {exported.stop}")
            subject, published = await c.wait_for(q, lambda s, d: s in ends[2:] and d.get("job_id") == job.job_id,
                                                  timeout)
            if subject != sj.MODEL_PUBLISHED:
                raise FlowError(f"job {job.job_id}: publishing to Ollama failed: {published.error.code}: "
                                f"{published.error.message}",
                                failure_hints(published.error, f"codetune job show {job.job_id}"))
            console.print(f"[green]published[/green] {published.name} on {published.ollama_host}")

        console.rule("[bold]5/5 chat")
        reply = await c.request(sj.OLLAMA_CHAT, OllamaChatRequest(
            model=name, messages=[{"role": "user", "content": prompt}], options={"num_predict": 48}), timeout=300)
        answer = reply["message"]["content"]
        console.print(f"[bold]you[/bold]: {prompt}\n[bold]{name}[/bold]: {answer}  [dim](ended: "
                      f"{reply.get('done_reason')}, {reply.get('eval_count')} tokens)[/dim]")

        result: dict[str, Any] = {"dataset_id": dataset_id, "job_id": job.job_id,
                                  "metrics": done.metrics.model_dump(), "exported": exported.model_dump(),
                                  "answer": answer, "report": report.model_dump(mode="json") if report else None}
        if push:
            console.rule("[bold]push")
            result["pushed"] = (await request_push(c, job.job_id, push, timeout=timeout)).commit_url
    return result
