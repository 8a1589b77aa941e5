"""`codetune pipeline`: upload → pull → tune → export → Ollama → one chat, watched stage by stage.

It replaces the seed's `scripts/hf_ollama_pipeline.py`, but drives the stages through events instead of
calling them: run it against workers anywhere (`codetune worker`), or let `codetune demo` run the stages
in-process. The HF token comes from the environment (settings), never from an argument.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from events import subjects as sj
from events.payloads import (
    ExportOptions,
    Hyperparameters,
    ModelPullRequested,
    OllamaChatRequest,
    TuningRequested,
)
from infra.settings import Settings

console = Console()


class PipelineError(RuntimeError):
    pass


async def run_pipeline(settings: Settings, repo_id: str, dataset: Path, name: str, hp: Hyperparameters,
                       export: ExportOptions, prompt: str, push: str | None = None,
                       timeout: float = 24 * 3600) -> dict[str, Any]:
    from infra.cli import client, follow_job, new_job_id, upload_dataset

    console.rule("[bold]1/5 dataset")
    uploaded = await upload_dataset(settings, dataset, None, "auto", True, 600)
    assert uploaded is not None
    if uploaded[0] != sj.DATASET_VALIDATED:
        raise PipelineError("the dataset failed validation")
    dataset_id = uploaded[1].dataset_id

    async with client(settings) as c:
        console.rule("[bold]2/5 base model")
        async with c.subscribe([sj.MODEL_PULLED, sj.MODEL_PULL_FAILED]) as q:
            await c.publish(ModelPullRequested(repo_id=repo_id))
            subject, pulled = await c.wait_for(q, lambda _, d: d["repo_id"] == repo_id, timeout)
        if subject != sj.MODEL_PULLED:
            raise PipelineError(f"{pulled.error.code}: {pulled.error.message}")
        console.print(f"[green]pulled[/green] {repo_id}@{pulled.sha[:12]} ({pulled.files} files, "
                      f"{pulled.bytes / 1e6:.1f} MB)")

        console.rule("[bold]3/5 fine-tune")
        job = TuningRequested(job_id=new_job_id(), base_model=repo_id, dataset_id=dataset_id,
                              hyperparameters=hp, name=name, export=export)
        ends = [sj.MODEL_EXPORTED, sj.MODEL_EXPORT_FAILED, sj.MODEL_PUBLISHED, sj.MODEL_PUBLISH_FAILED]
        async with c.subscribe([sj.progress_subject(job.job_id), sj.TUNING_COMPLETED, sj.TUNING_FAILED,
                                sj.TUNING_CANCELLED, *ends]) as q:
            await c.publish(job)
            console.print(f"job [bold]{job.job_id}[/bold]")
            subject, done = await follow_job(c, q, job.job_id, timeout)
            if subject != sj.TUNING_COMPLETED:
                raise PipelineError(f"tuning ended: {subject}")

            console.rule("[bold]4/5 export + Ollama")
            subject, exported = await c.wait_for(q, lambda s, d: s in ends and d.get("job_id") == job.job_id,
                                                 timeout)
            if subject != sj.MODEL_EXPORTED:
                raise PipelineError(f"{exported.error.code}: {exported.error.message}")
            console.print(f"[green]exported[/green] {exported.mode}: {exported.model_key}"
                          + (f" + {exported.adapter_key}" if exported.adapter_key else "")
                          + f"; Modelfile {exported.modelfile_key}; stop {exported.stop}")
            subject, published = await c.wait_for(q, lambda s, d: s in ends[2:] and d.get("job_id") == job.job_id,
                                                  timeout)
            if subject != sj.MODEL_PUBLISHED:
                raise PipelineError(f"{published.error.code}: {published.error.message}")
            console.print(f"[green]published[/green] {published.name} on {published.ollama_host}")

        console.rule("[bold]5/5 chat")
        reply = await c.request(sj.OLLAMA_CHAT, OllamaChatRequest(
            model=name, messages=[{"role": "user", "content": prompt}], options={"num_predict": 48}), timeout=300)
        answer = reply["message"]["content"]
        console.print(f"[bold]you[/bold]: {prompt}\n[bold]{name}[/bold]: {answer}  [dim](ended: "
                      f"{reply.get('done_reason')}, {reply.get('eval_count')} tokens)[/dim]")

    result: dict[str, Any] = {"dataset_id": dataset_id, "job_id": job.job_id, "metrics": done.metrics.model_dump(),
                              "exported": exported.model_dump(), "answer": answer}
    if push:
        console.rule("[bold]push")
        result["pushed"] = await push_to_hub(settings, push, exported, done)
    return result


def model_card(exported: Any, done: Any) -> str:
    m = done.metrics
    return "\n".join([
        "---", f"base_model: {done.base_model}", "library_name: peft", "tags: [codetune, lora, gguf, ollama]", "---",
        f"# {exported.name}", "",
        f"LoRA fine-tune of [{done.base_model}](https://huggingface.co/{done.base_model}) (commit `{done.sha}`) "
        "made with CodeTune.", "",
        f"- steps: {m.steps}, epochs: {m.epochs:.2f}, tokens: {m.tokens}",
        f"- loss: {m.first_loss} → {m.train_loss}; eval loss: {m.eval_loss}",
        f"- export: {exported.mode}; Ollama stop tokens: {exported.stop}", "",
        "Files: `adapter/` (peft), GGUF file(s) and a `Modelfile` for `ollama create`.", "",
    ])


async def push_to_hub(settings: Settings, repo: str, exported: Any, done: Any) -> str:
    """Upload adapter, GGUF(s), Modelfile and a model card to a (private) hub repo; token from settings."""
    import asyncio

    from huggingface_hub import HfApi

    from storage.objects import ObjectStore

    if settings.hf_token is None:
        raise PipelineError("--push needs HUGGINGFACE_TOKEN (or HF_TOKEN) in the environment")
    store = ObjectStore(settings)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        await store.download_prefix(done.adapter_key, root / "adapter")
        for key in filter(None, [exported.model_key, exported.adapter_key, exported.modelfile_key]):
            await store.download(key, root / Path(key).name)
        (root / "README.md").write_text(model_card(exported, done))
        api = HfApi(endpoint=settings.hf_endpoint, token=settings.hf_token.get_secret_value())

        def upload() -> str:
            api.create_repo(repo, private=True, exist_ok=True)
            info = api.upload_folder(repo_id=repo, folder_path=str(root),
                                     commit_message=f"CodeTune {done.job_id}")
            return str(getattr(info, "commit_url", repo))

        url = await asyncio.to_thread(upload)
    console.print(f"[green]pushed[/green] to {repo}: {url}")
    return url
