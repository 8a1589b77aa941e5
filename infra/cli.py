"""`codetune` — the command line. Every command talks to the stages through events (events.client)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from core import formats
from core.settings import Settings, get_settings
from events.ids import new_job_id

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
stack_app = typer.Typer(no_args_is_help=True, help="The embedded local stack (NATS, MongoDB-wire, S3).")
dataset_app = typer.Typer(no_args_is_help=True, help="Upload and list training datasets.")
dlq_app = typer.Typer(no_args_is_help=True, help="Inspect dead-lettered messages.")
model_app = typer.Typer(no_args_is_help=True, help="Pull base models from the Hugging Face hub; push fine-tunes to it.")
job_app = typer.Typer(no_args_is_help=True, help="Inspect and cancel tuning jobs.")
saved_app = typer.Typer(no_args_is_help=True, help="Saved models: keep a finished job under a name; re-tune it.")
app.add_typer(stack_app, name="stack")
app.add_typer(dataset_app, name="dataset")
app.add_typer(dlq_app, name="dlq")
app.add_typer(model_app, name="model")
app.add_typer(job_app, name="job")
app.add_typer(saved_app, name="user-model")
console = Console()
T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


def fail(message: str, code: int = 1) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


@contextlib.asynccontextmanager
async def client(settings: Settings) -> AsyncIterator[Any]:
    from events.client import CodeTuneClient

    try:
        c = await CodeTuneClient.connect(settings, source="codetune/cli")
    except Exception as e:
        fail(f"cannot reach NATS at {settings.nats_url} ({type(e).__name__}); is the stack running? "
             "(`codetune stack start`)")
    try:
        yield c
    finally:
        await c.close()


_CLOSED: set[int] = set()  # ids of the MongoDB clients `database` opened and closed again


def _bound() -> bool:
    """Beanie is bound to a live client already (stages running in this process: the demo, the tests)."""
    from storage.documents import Dataset

    try:
        return id(Dataset.get_pymongo_collection().database.client) not in _CLOSED
    except Exception:  # not initialised yet
        return False


@contextlib.asynccontextmanager
async def database(settings: Settings) -> AsyncIterator[None]:
    """Beanie bound to MongoDB for the block: the binding already there, else a client of its own, closed after
    (re-binding would take the database away from stages running in the same process)."""
    from storage.db import init_db

    if _bound():
        yield
        return
    mongo = await init_db(settings)
    try:
        yield
    finally:
        _CLOSED.add(id(mongo))
        await mongo.close()


# ------------------------------------------------------------------ stack


@stack_app.command("start")
def stack_start() -> None:
    """Start NATS, SecantusDB and SeaweedFS on 127.0.0.1 (idempotent) and provision streams."""
    from infra.stack import LocalStack, StackError

    s = get_settings()
    try:
        LocalStack(s).start()
    except StackError as e:
        fail(str(e))
    run(_provision(s))


@stack_app.command("provision")
def stack_provision() -> None:
    """Create or update the JetStream streams and durable consumers (for an external NATS cluster)."""
    run(_provision(get_settings()))
    console.print("streams and consumers provisioned")


async def _provision(s: Settings) -> None:
    from events.client import provision_as_admin

    await provision_as_admin(s)  # as the admin user where NATS has users (README "Security")


@stack_app.command("install")
def stack_install() -> None:
    """Prepare the stack without starting it (creates SecantusDB's own virtualenv)."""
    from infra.stack import LocalStack

    st = LocalStack(get_settings())
    st.install()
    console.print(f"SecantusDB: {st.secantus_python()}")


@stack_app.command("stop")
def stack_stop() -> None:
    """Stop the local stack; data stays in the stack folder."""
    from infra.stack import LocalStack

    LocalStack(get_settings()).stop()


@stack_app.command("status")
def stack_status() -> None:
    """Show each service's pid, port and whether it answers."""
    from infra.stack import LocalStack

    st = LocalStack(get_settings())
    table = Table("service", "pid", "address", "ready")
    for name, info in st.status().items():
        table.add_row(name, str(info["pid"] or "-"), f"127.0.0.1:{info['port']}",
                      "[green]yes[/green]" if info["ready"] else "[red]no[/red]")
    console.print(table)
    console.print(f"data and logs: {st.root}")


@app.command("setup-llamacpp")
def setup_llamacpp() -> None:
    """Install llama.cpp's GGUF converters (from the llama-cpp-python sdist) under the stack folder."""
    from handlers.export.llamacpp import ensure_converters

    console.print(f"llama.cpp converters: {ensure_converters(get_settings())}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def bridge(ctx: typer.Context) -> None:
    """Serve the webhook bridge and the original REST API (`--host`, `--port`; see `--help` there)."""
    from handlers.bridge.__main__ import main as bridge_main

    raise typer.Exit(bridge_main(list(ctx.args)) or 0)


# ------------------------------------------------------------------ workers


@app.command()
def worker(
    stages: list[str] = typer.Argument(None, help="stages to run (default: all)"),
    access_log: bool = typer.Option(False, help="log a Received/Processed line per message (at INFO)"),
    exit_when_idle: float | None = typer.Option(
        None, "--exit-when-idle", metavar="SECONDS", min=0.1,
        help="drain and exit (code 0) after SECONDS with no message in flight or received (scale to zero)"),
) -> None:
    """Run stage handlers in this process. Start several to scale out: they share durable consumers."""
    import logging

    from handlers.app import build_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    application = build_app(stages or None, access_log_level=logging.INFO if access_log else logging.DEBUG,
                            exit_when_idle=exit_when_idle)
    asyncio.run(application.run())


# ------------------------------------------------------------------ datasets


@dataset_app.command("upload")
def dataset_upload(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, readable=True),
    name: str | None = typer.Option(None, help="name to record (default: the file name)"),
    fmt: str = typer.Option("auto", "--format", help=" | ".join(("auto", *formats.NAMES))),
    wait: bool = typer.Option(True, help="wait for the datasets stage's verdict"),
    timeout: float = typer.Option(120.0),
) -> None:
    """Stream FILE to the bucket and publish `dataset.uploaded`."""
    result = run(upload_dataset(get_settings(), file, name, fmt, wait, timeout))
    if result and result[0] == "dataset.failed":
        raise typer.Exit(2)


async def upload_dataset(s: Settings, file: Path, name: str | None, fmt: str, wait: bool, timeout: float
                         ) -> tuple[str, Any] | None:
    from events import subjects as sj
    from events.envelope import derived_id
    from handlers.datasets.service import StoredUpload, answer_of, settle_upload, store_upload
    from storage.objects import ObjectStore

    store = ObjectStore(s)
    await store.ensure_bucket()
    with open(file, "rb") as f:
        stored = await store_upload(store, f, name or file.name, fmt=fmt)
    async with client(s) as c, c.subscribe([sj.DATASET_VALIDATED, sj.DATASET_FAILED]) as q, database(s):

        async def announce(ev: Any) -> str:
            return (await c.publish(ev, event_id=derived_id(ev.dataset_id, sj.DATASET_UPLOADED))).id

        settled = await settle_upload(store, StoredUpload(stored.event, stored.size, stored.sha256), announce)
        event = settled.event
        if settled.reused is not None:
            ds = settled.reused
            console.print(f"[bold]{file.name}[/bold] has the same content as dataset_id=[bold]{ds.dataset_id}[/bold] "
                          f"({ds.name}, {ds.status}): reused, nothing stored twice")
            answer = answer_of(ds)
            if answer is not None:
                subject = sj.DATASET_VALIDATED if ds.status == "validated" else sj.DATASET_FAILED
                print_dataset_answer(subject, answer)
                return subject, answer
        else:
            console.print(f"uploaded [bold]{file.name}[/bold] → s3://{s.s3_bucket}/{event.key}  "
                          f"dataset_id=[bold]{event.dataset_id}[/bold] sha256={settled.sha256[:12]}")
        if not wait:
            return None
        subject, answer = await c.wait_for(q, lambda _, d: d.get("dataset_id") == event.dataset_id, timeout)
    print_dataset_answer(subject, answer)
    return subject, answer


def print_dataset_answer(subject: str, answer: Any) -> None:
    if subject == "dataset.validated":
        p = answer.profile
        console.print(f"[green]validated[/green] {answer.dataset_id}: format={p.format} rows={p.rows} "
                      f"≈{p.tokens_estimate} tokens ({p.bytes} bytes)" + (f" roles={p.roles}" if p.roles else ""))
    else:
        console.print(f"[red]failed[/red] {answer.dataset_id}: {answer.error.message}")
        for le in answer.line_errors:
            console.print(f"  line {le.line}: {le.message}")


@dataset_app.command("list")
def dataset_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """List datasets with their status and profile."""
    rows = run(_datasets(get_settings()))
    if as_json:
        print(json.dumps(rows, default=str, indent=2))
        return
    table = Table("dataset_id", "name", "status", "format", "rows", "≈tokens", "created")
    for r in rows:
        prof = r.get("profile") or {}
        table.add_row(r["dataset_id"], r["name"], r["status"], r.get("format") or "-", str(prof.get("rows", "-")),
                      str(prof.get("tokens_estimate", "-")), str(r["created_at"])[:19])
    console.print(table)


async def _datasets(s: Settings) -> list[dict[str, Any]]:
    from storage.documents import Dataset

    async with database(s):
        docs = await Dataset.find_all().sort("-created_at").to_list()
    return [d.model_dump(exclude={"id"}) for d in docs]


# ------------------------------------------------------------------ models


@model_app.command("pull")
def model_pull(
    repo_id: str,
    revision: str = typer.Option("main", help="branch, tag or commit sha"),
    wait: bool = typer.Option(True),
    timeout: float = typer.Option(1800.0),
) -> None:
    """Publish `model.pull.requested` (token from HUGGINGFACE_TOKEN only) and wait for the answer."""
    from events import subjects as sj
    from events.payloads import ModelPullRequested

    try:
        event = ModelPullRequested(repo_id=repo_id, revision=revision)
    except ValueError as e:
        fail(str(e))

    async def go() -> None:
        async with client(get_settings()) as c, c.subscribe([sj.MODEL_PULLED, sj.MODEL_PULL_FAILED]) as q:
            await c.publish(event)
            console.print(f"requested {repo_id}@{revision}")
            if not wait:
                return
            subject, answer = await c.wait_for(
                q, lambda _, d: d["repo_id"] == repo_id and d.get("revision") == revision, timeout)
        if subject == sj.MODEL_PULLED:
            console.print(f"[green]pulled[/green] {repo_id}@{answer.sha[:12]}: {answer.files} files, "
                          f"{answer.bytes / 1e6:.1f} MB → {answer.prefix}")
        else:
            fail(f"{answer.error.code}: {answer.error.message}")

    run(go())


@model_app.command("push")
def model_push(
    job_id: str,
    repo_id: str = typer.Argument(..., help="the hub repo, user/name"),
    public: bool = typer.Option(False, help="create the repo public (default: private)"),
    timeout: float = typer.Option(3600.0),
) -> None:
    """Push a finished job's adapter, GGUFs, Modelfile and a model card to a hub repo: publishes
    `model.push.requested` and waits for the models stage (whose HUGGINGFACE_TOKEN is used; never an argument)."""
    from events.payloads import ModelPushRequested
    from infra.pipeline import PipelineError, request_push

    try:
        ModelPushRequested(job_id=job_id, repo_id=repo_id, private=not public)
    except ValueError as e:
        fail(str(e))

    async def go() -> None:
        async with client(get_settings()) as c:
            await request_push(c, job_id, repo_id, private=not public, timeout=timeout)

    try:
        run(go())
    except PipelineError as e:
        fail(str(e))


@model_app.command("list")
def model_list() -> None:
    """List pulled base models."""

    async def go() -> list[Any]:
        from storage.documents import BaseLLM

        async with database(get_settings()):
            return await BaseLLM.find_all().sort("-created_at").to_list()

    table = Table("repo_id", "revision", "sha", "status", "files", "MB")
    for d in run(go()):
        table.add_row(d.repo_id, d.revision, (d.sha or "-")[:12], d.status, str(d.files), f"{d.bytes / 1e6:.1f}")
    console.print(table)


# ------------------------------------------------------------------ tuning


@app.command()
def tune(
    model: str = typer.Option(..., "--model", help="base model repo id"),
    dataset: str = typer.Option(..., "--dataset", help="dataset id (see `codetune dataset list`)"),
    name: str | None = typer.Option(None, help="Ollama model name to publish as"),
    revision: str = typer.Option("main"),
    epochs: float | None = typer.Option(None),
    max_steps: int | None = typer.Option(None),
    learning_rate: float = typer.Option(2e-4),
    batch_size: int = typer.Option(4),
    grad_accum: int = typer.Option(1, "--gradient-accumulation-steps"),
    max_seq_len: int = typer.Option(512),
    lora_r: int = typer.Option(8),
    lora_alpha: float = typer.Option(16),
    lora_dropout: float = typer.Option(0.05),
    target_modules: str | None = typer.Option(None, help="comma-separated, or 'all-linear'"),
    validation_split: float = typer.Option(0.1),
    eval_steps: int = typer.Option(50),
    save_steps: int = typer.Option(50),
    early_stopping_patience: int | None = typer.Option(None),
    seed: int = typer.Option(42),
    packing: bool = typer.Option(True),
    no_export: bool = typer.Option(False, help="do not export/serve after training"),
    eval_dataset: str | None = typer.Option(None, help="dataset id of held-out rows for the evaluation report"),
    eval_samples: int = typer.Option(3, help="held-out prompts answered in the evaluation report"),
    gate: bool = typer.Option(True, help="publish only if the evaluation report passes the quality gate"),
    wait: bool = typer.Option(False, help="follow progress until the job ends"),
) -> None:
    """Request a LoRA fine-tuning job (`tuning.requested`)."""
    from events.payloads import Hyperparameters, TuningRequested

    hp: dict[str, Any] = {
        "epochs": epochs, "max_steps": max_steps, "learning_rate": learning_rate, "batch_size": batch_size,
        "gradient_accumulation_steps": grad_accum, "max_seq_len": max_seq_len, "lora_r": lora_r,
        "lora_alpha": lora_alpha, "lora_dropout": lora_dropout, "validation_split": validation_split,
        "eval_steps": eval_steps, "save_steps": save_steps, "early_stopping_patience": early_stopping_patience,
        "seed": seed, "packing": packing, "eval_samples": eval_samples,
    }
    if target_modules:
        hp["target_modules"] = target_modules if target_modules == "all-linear" else target_modules.split(",")
    try:
        event = TuningRequested(job_id=new_job_id(), base_model=model, revision=revision, dataset_id=dataset,
                                name=name, hyperparameters=Hyperparameters.model_validate(
                                    {k: v for k, v in hp.items() if v is not None}),
                                eval_dataset_id=eval_dataset,
                                export=None if no_export else {"gate": gate})  # type: ignore[arg-type]
    except ValueError as e:
        fail(str(e))
    outcome = run(submit_job(get_settings(), event, wait))
    if outcome and outcome[0] != "tuning.completed":
        raise typer.Exit(2)


async def submit_job(s: Settings, event: Any, wait: bool, timeout: float = 24 * 3600) -> tuple[str, Any] | None:
    from events import subjects as sj

    async with client(s) as c, c.subscribe(
        [sj.progress_subject(event.job_id), sj.TUNING_COMPLETED, sj.TUNING_FAILED, sj.TUNING_CANCELLED]
    ) as q:
        await c.publish(event)
        console.print(f"job [bold]{event.job_id}[/bold] requested")
        await print_recorded(s, event.job_id)
        if not wait:
            return None
        return await follow_job(c, q, event.job_id, timeout)


async def print_recorded(s: Settings, job_id: str) -> None:
    """Wait (at most `intake_wait_s`) for the intake stage to record the job, then say so with its queue
    position: from here on `codetune job show` and the bridge's GETs know the job, trainer free or not."""
    from storage.jobs import queue_position, wait_recorded

    try:
        async with database(s):
            job = await wait_recorded(job_id, s.intake_wait_s)
            position = await queue_position(job) if job else None
    except Exception as e:  # MongoDB unreachable: the request is on the bus all the same
        console.print(f"[yellow]cannot check the job's record ({type(e).__name__}); it is requested[/yellow]")
        return
    if job is None:
        console.print(f"[yellow]not recorded within {s.intake_wait_s:.0f}s: is an intake worker running? "
                      "(`codetune worker intake`)[/yellow]")
    elif position is not None:
        console.print(f"job [bold]{job_id}[/bold] {job.status}, position {position} in the queue")
    else:
        console.print(f"job [bold]{job_id}[/bold] {job.status}")


async def follow_job(c: Any, q: Any, job_id: str, timeout: float) -> tuple[str, Any]:
    """Render progress events as a live bar until the job's terminal event."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from events import subjects as sj

    terminal = {sj.TUNING_COMPLETED, sj.TUNING_FAILED, sj.TUNING_CANCELLED}
    with Progress(TextColumn("[bold]{task.fields[status]}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                  TimeRemainingColumn(), console=console, transient=False) as bar:
        task = bar.add_task("train", total=None, status="queued", loss="-", tps="-")
        while True:
            subject, ev = await c.wait_for(q, lambda s, d: d.get("job_id") == job_id, timeout)
            if subject in terminal:
                break
            bar.update(task, total=ev.max_steps or None, completed=ev.step, status=ev.status,
                       loss=f"{ev.loss:.3f}" if ev.loss is not None else "-",
                       tps=f"{ev.tokens_per_s:.0f}" if ev.tokens_per_s else "-")
            if ev.message and ev.status == "waiting":
                bar.console.print(f"[yellow]{ev.message}[/yellow]")
            elif ev.message and ev.message.startswith(("dataset lint:", "estimate:")):
                bar.console.print(ev.message)
    if subject == sj.TUNING_COMPLETED:
        m = ev.metrics
        console.print(f"[green]succeeded[/green] {job_id}: {m.steps} steps, loss {m.first_loss:.3f} → "
                      f"{m.train_loss:.3f}" + (f", eval {m.eval_loss:.3f}" if m.eval_loss is not None else "")
                      + f", {m.tokens_per_s:.0f} tok/s; adapter {ev.adapter_key}")
    elif subject == sj.TUNING_FAILED:
        console.print(f"[red]failed[/red] {job_id}: {ev.error.code}: {ev.error.message}")
    else:
        console.print(f"[yellow]cancelled[/yellow] {job_id} at step {ev.step}")
    return subject, ev


@job_app.command("show")
def job_show(job_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Show a job's status, progress, metrics and artifacts."""

    async def go() -> Any:
        from storage.documents import TuningJob

        async with database(get_settings()):
            return await TuningJob.find_one(TuningJob.job_id == job_id)

    doc = run(go())
    if doc is None:
        fail(f"no job {job_id!r}")
    data = doc.model_dump(exclude={"id", "loss_history", "lease_owner", "lease_until"})
    data["progress"] = round(doc.progress, 4)
    if as_json:
        print(json.dumps(data, default=str, indent=2))
        return
    from handlers.tuning.lint import estimate_summary, lint_text

    table = Table("field", "value", show_header=False)
    for k, v in data.items():
        if k == "report":
            continue
        if k == "dataset_lint" and doc.dataset_lint is not None:
            table.add_row(k, lint_text(doc.dataset_lint))
        elif k == "estimate" and doc.estimate is not None:
            actual = (doc.metrics or {}).get("duration_s")
            table.add_row(k, estimate_summary(doc.estimate)[len("estimate: "):]
                          + (f"; actual run {actual:.0f} s" if actual else ""))
        elif v not in (None, [], {}):
            table.add_row(k, json.dumps(v, default=str) if isinstance(v, dict | list) else str(v))
    console.print(table)
    show_report(doc)


def show_report(doc: Any) -> None:
    """The job's evaluation report card (README "Evaluation report and quality gate"), if it has one."""
    from rich.markdown import Markdown

    from handlers.report import of_job, render_markdown

    report = of_job(doc)
    if report is None:
        console.print("[dim]no evaluation report yet[/dim]")
        return
    console.print(Markdown(render_markdown(report)))


@job_app.command("list")
def job_list(limit: int = 20) -> None:
    """List recent jobs."""

    async def go() -> list[Any]:
        from storage.documents import TuningJob

        async with database(get_settings()):
            return await TuningJob.find_all().sort("-created_at").limit(limit).to_list()

    table = Table("job_id", "status", "base model", "dataset", "step", "loss", "created")
    for j in run(go()):
        table.add_row(j.job_id, j.status, j.base_model, j.dataset_id, f"{j.step}/{j.max_steps}",
                      f"{j.loss:.3f}" if j.loss is not None else "-", str(j.created_at)[:19])
    console.print(table)


@job_app.command("cancel")
def job_cancel(job_id: str) -> None:
    """Publish `tuning.cancel.requested`: the job stops at its next step."""
    from events.payloads import TuningCancelRequested

    async def go() -> None:
        async with client(get_settings()) as c:
            await c.publish(TuningCancelRequested(job_id=job_id))

    run(go())
    console.print(f"cancel requested for {job_id}")


# ------------------------------------------------------------------ saved models


@app.command()
def gc(
    dry_run: bool = typer.Option(False, "--dry-run", help="list what the policy removes; remove nothing"),
    caches: bool = typer.Option(False, "--caches", help="also remove caches shared by jobs (base models, GGUFs)"),
) -> None:
    """Apply the retention policy (settings `retention_*`): finished jobs' local files, succeeded jobs'
    checkpoints, failed/cancelled jobs' checkpoints past their days."""
    run(_gc(get_settings(), dry_run, caches))


async def _gc(s: Settings, dry_run: bool, caches: bool) -> None:
    from storage import retention
    from storage.objects import ObjectStore

    store = ObjectStore(s)
    async with database(s):
        removals = await retention.plan(store, s, caches=caches)
    if not removals:
        console.print("nothing to remove")
        return
    table = Table("where", "path", "MB", "why")
    for r in removals:
        table.add_row(r.where, r.path, f"{r.bytes / 1e6:.1f}", r.reason)
    console.print(table)
    total = sum(r.bytes for r in removals) / 1e6
    if dry_run:
        console.print(f"dry run: {len(removals)} item(s), {total:.1f} MB would be removed")
        return
    freed = await retention.apply(store, removals)
    console.print(f"removed {len(removals)} item(s), {freed / 1e6:.1f} MB")


@saved_app.command("save")
def saved_save(job_id: str, name: str = typer.Option(..., "--name")) -> None:
    """Save a succeeded job as a named model (parameters, metrics, artifact keys)."""
    from core.errors import CodeTuneError
    from handlers.tuning.saved import save_job

    async def go() -> Any:
        async with database(get_settings()):
            return await save_job(job_id, name)

    try:
        m = run(go())
    except CodeTuneError as e:
        fail(e.message)
    console.print(f"saved [bold]{m.model_id}[/bold] {m.name!r} from {job_id}: adapter {m.artifacts.get('adapter')}")


@saved_app.command("list")
def saved_list() -> None:
    """List saved models."""

    async def go() -> list[Any]:
        from storage.documents import UserModel

        async with database(get_settings()):
            return await UserModel.find_all().sort("-created_at").to_list()

    table = Table("model_id", "name", "base model", "dataset", "job", "loss")
    for m in run(go()):
        loss = (m.result or {}).get("loss")
        table.add_row(m.model_id, m.name, m.base_model or "-", m.dataset_id or "-", m.job_id or "-",
                      f"{loss:.3f}" if isinstance(loss, float) else "-")
    console.print(table)


@saved_app.command("import")
def saved_import(
    model_id: str,
    overrides: list[str] = typer.Option([], "--set", help="KEY=VALUE, e.g. learning_rate=1e-4 or dataset_id=ds-…"),
    wait: bool = typer.Option(False, help="follow progress until the job ends"),
) -> None:
    """Request a new tuning job with a saved model's parameters (and overrides)."""
    from pydantic import ValidationError

    from core.errors import CodeTuneError
    from handlers.tuning.saved import find, request_from_saved

    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"--set expects KEY=VALUE, got {item!r}")
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value

    async def go() -> Any:
        async with database(get_settings()):
            return request_from_saved(await find(model_id), parsed, job_id=new_job_id())

    try:
        event = run(go())
    except (CodeTuneError, ValidationError) as e:
        fail(str(getattr(e, "message", e)))
    outcome = run(submit_job(get_settings(), event, wait))
    if outcome and outcome[0] != "tuning.completed":
        raise typer.Exit(2)


# ------------------------------------------------------------------ dead letters


@dlq_app.command("list")
def dlq_list(
    limit: int = typer.Option(20, help="how many letters to show (latest first)"),
    subject: str = typer.Option("", help="only letters for this original subject (NATS wildcards allowed)"),
) -> None:
    """Show the latest dead-lettered messages: stream sequence, time, subject, deliveries and reason."""
    run(_dlq(get_settings(), limit, subject))


async def _dlq(s: Settings, limit: int, subject: str = "") -> None:
    from events import subjects as sj
    from events.streams import DEAD_LETTERS

    wanted = sj.dead_letter_subject(subject) if subject else f"{sj.DEAD_LETTER}.>"
    async with client(s) as c:
        info = await c.js.stream_info(DEAD_LETTERS.name, subjects_filter=wanted)
        total = sum((info.state.subjects or {}).values()) if subject else info.state.messages
        table = Table("seq", "at", "subject", "delivered", "stream seq", "code", "reason")
        shown = 0
        seq = info.state.last_seq
        while shown < limit and seq >= max(info.state.first_seq, 1):
            with contextlib.suppress(Exception):
                m = await c.js.get_msg(DEAD_LETTERS.name, seq)
                if subject and not _subject_matches(wanted, m.subject or ""):
                    raise LookupError
                d = json.loads(m.data or b"{}")
                table.add_row(str(seq), str(d.get("at", ""))[:19], d.get("subject", ""),
                              str(d.get("num_delivered", "")), str(d.get("stream_seq", "")),
                              d["reason"]["code"], d["reason"]["message"][:80])
                shown += 1
            seq -= 1
        console.print(table)
        if total > shown:
            console.print(f"{total - shown} more not shown (of {total}); use --limit or --subject")


def _subject_matches(pattern: str, subject: str) -> bool:
    p, t = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(t) > i
        if i >= len(t) or (tok != "*" and tok != t[i]):
            return False
    return len(p) == len(t)


@dlq_app.command("show")
def dlq_show(seq: int) -> None:
    """Print one dead letter in full (the body decoded where it is text)."""
    run(_dlq_show(get_settings(), seq))


async def _dlq_show(s: Settings, seq: int) -> None:
    import base64

    from events.streams import DEAD_LETTERS

    async with client(s) as c:
        try:
            m = await c.js.get_msg(DEAD_LETTERS.name, seq)
        except Exception as e:
            console.print(f"no dead letter with sequence {seq}: {e}")
            raise typer.Exit(1) from e
        d = json.loads(m.data or b"{}")
        body = d.pop("body", "")
        console.print_json(json.dumps(d, default=str))
        if isinstance(body, str) and body.startswith("b64:"):
            raw = base64.b64decode(body[4:])
            try:
                body = raw.decode("utf-8")
            except UnicodeDecodeError:
                body = f"<{len(raw)} bytes, not text> {body[:200]}"
        console.print("body" + (" (a prefix)" if d.get("body_truncated") else "") + ":", markup=False)
        console.print(body, markup=False, highlight=False)
        if d.get("body_key"):
            console.print(f"the full body ({d.get('body_size')} bytes, sha256 {d.get('body_sha256')}) is in the "
                          f"bucket at {d['body_key']}", markup=False)


# ------------------------------------------------------------------ demo


@app.command()
def demo(stop_stack: bool = typer.Option(False, help="stop the local stack afterwards"),
         real: bool = typer.Option(False, "--real", help="a real model (SmolLM2-135M-Instruct) learns a made-up "
                                   "fact; prints its answers (a few minutes on 2 cores)")) -> None:
    """Run the main job end to end on the embedded local stack (started if needed)."""
    from infra.demo import devkit_or_error, run_demo, run_real_demo
    from infra.stack import LocalStack, StackError

    if problem := devkit_or_error():
        fail(problem)
    s = get_settings()
    stack = LocalStack(s)
    try:
        stack.start()
    except StackError as e:
        fail(str(e))
    from infra.pipeline import PipelineError

    try:
        run(run_real_demo(s) if real else run_demo(s))
    except PipelineError as e:
        fail(str(e))
    finally:
        if stop_stack:
            stack.stop()
        else:
            console.print("the stack keeps running: `codetune stack stop` stops it")


@app.command()
def pipeline(
    repo_id: str = typer.Argument(..., help="base model repo id on the hub"),
    dataset: Path = typer.Option(..., "--dataset", exists=True, dir_okay=False, help="training file"),
    name: str = typer.Option(..., "--name", help="Ollama model name"),
    epochs: float | None = typer.Option(None),
    max_steps: int | None = typer.Option(None),
    learning_rate: float = typer.Option(2e-4),
    batch_size: int = typer.Option(4),
    max_seq_len: int = typer.Option(512),
    lora_r: int = typer.Option(8),
    mode: str = typer.Option("adapter", help="adapter | merged"),
    outtype: str = typer.Option("f16", help="f16 | bf16 | q8_0"),
    quantize: str | None = typer.Option(None, help="Ollama create-time quantization, e.g. q4_K_M"),
    system: str | None = typer.Option(None, help="SYSTEM prompt for the Modelfile"),
    prompt: str = typer.Option("Hello! Who are you?", help="the one chat message sent at the end"),
    push: str | None = typer.Option(None, help="then push adapter, GGUFs, Modelfile and a model card to this hub "
                                    "repo (user/name) over model.push.requested, with the models stage's token"),
) -> None:
    """Upload, pull, tune, export, create the Ollama model and chat once (needs running workers)."""
    from events.payloads import ExportOptions, Hyperparameters
    from infra.pipeline import PipelineError, run_pipeline

    try:
        hp = Hyperparameters.model_validate({k: v for k, v in {
            "epochs": epochs, "max_steps": max_steps, "learning_rate": learning_rate, "batch_size": batch_size,
            "max_seq_len": max_seq_len, "lora_r": lora_r}.items() if v is not None})
        export = ExportOptions.model_validate({"mode": mode, "outtype": outtype, "quantize": quantize,
                                               "system": system})
    except ValueError as e:
        fail(str(e))
    try:
        run(run_pipeline(get_settings(), repo_id, dataset, name, hp, export, prompt, push))
    except PipelineError as e:
        fail(str(e))


# ------------------------------------------------------------------ contract


@app.command()
def contract() -> None:
    """Print the event contract table (subjects, payloads, producers, consumers)."""
    from handlers.contract import contract_markdown

    print(contract_markdown())


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
