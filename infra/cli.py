"""`codetune` — the command line. Every command talks to the stages through events (events.client).

The commands here are thin: the flows they run (connect, upload, follow a job, dead letters) live in
infra/flows.py, shared with `codetune pipeline` (infra/pipeline.py) and `codetune demo` (infra/demo.py).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import typer
from pydantic import ValidationError
from rich.markup import escape
from rich.table import Table

from core import formats
from core.settings import Settings, get_settings
from events.ids import new_job_id
from events.payloads import Hyperparameters
from infra import console as loudness
from infra.console import console
from infra.flows import (
    FlowError,
    client,
    database,
    dataset_failure,
    job_losses,
    list_datasets,
    list_dead_letters,
    print_report,
    pull_model,
    request_push,
    show_dead_letter,
    submit_job,
    upload_dataset,
)
from infra.options import describe, hyperparameter_options

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="`codetune` — fine-tune an open LLM on your data and serve it with Ollama.")
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
T = TypeVar("T")


@app.callback()
def _global(verbose: bool = typer.Option(False, "-v", "--verbose", help="show library progress bars, warnings, "
                                         "INFO logs and tracebacks")) -> None:
    loudness.configure(verbose)


def run(coro: Awaitable[T]) -> T:
    from core import tracing

    tracing.configure(get_settings(), "codetune-cli")  # CODETUNE_TRACING: the command's events carry its trace
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    finally:
        tracing.flush()


def fail(message: str, code: int = 1) -> None:
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


# ------------------------------------------------------------------ stack


@stack_app.command("start")
def stack_start(nats_cluster: int | None = typer.Option(
        None, "--nats-cluster", min=1, max=5, help="run NATS as a JetStream cluster of N nodes (3: streams with "
        "3 replicas; kept for later starts and clients; 1 goes back to one server)")) -> None:
    """Start NATS, SecantusDB and SeaweedFS on 127.0.0.1 (idempotent) and provision streams."""
    from infra.stack import LocalStack, StackError

    s = get_settings()
    if nats_cluster is not None and nats_cluster != s.stack_nats_cluster:
        s = type(s)(stack_nats_cluster=nats_cluster)  # derives the node URLs and replicas (core/settings.py)
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
    metrics_port: int | None = typer.Option(
        None, "--metrics-port", metavar="PORT", min=0, max=65535,
        help="serve Prometheus metrics on PORT (0: any free port, logged; default CODETUNE_METRICS_PORT)"),
) -> None:
    """Run stage handlers in this process. Start several to scale out: they share durable consumers."""
    import logging

    from handlers.app import build_app

    # a service logs at INFO whatever the CLI's console level (force: replaces the quiet default's handler)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", force=True)
    logging.getLogger("nats").setLevel(logging.NOTSET)
    settings = get_settings()
    if metrics_port is not None:
        settings = settings.model_copy(update={"metrics_port": metrics_port})
    application = build_app(stages or None, settings, access_log_level=logging.INFO if access_log else logging.DEBUG,
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
        raise dataset_failure(result[1], file)


@dataset_app.command("list")
def dataset_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """List datasets with their status and profile."""
    rows = run(list_datasets(get_settings()))
    if as_json:
        print(json.dumps(rows, default=str, indent=2))
        return
    table = Table("dataset_id", "name", "status", "format", "rows", "≈tokens", "created")
    for r in rows:
        prof = r.get("profile") or {}
        table.add_row(r["dataset_id"], r["name"], r["status"], r.get("format") or "-", str(prof.get("rows", "-")),
                      str(prof.get("tokens_estimate", "-")), str(r["created_at"])[:19])
    console.print(table)


# ------------------------------------------------------------------ models


@model_app.command("pull")
def model_pull(
    repo_id: str,
    revision: str = typer.Option("main", help="branch, tag or commit sha"),
    wait: bool = typer.Option(True),
    timeout: float = typer.Option(1800.0),
) -> None:
    """Publish `model.pull.requested` (token from HUGGINGFACE_TOKEN only) and wait for the answer."""
    from events.payloads import ModelPullRequested

    try:
        event = ModelPullRequested(repo_id=repo_id, revision=revision)
    except ValidationError as e:
        fail(describe(e))

    async def go() -> None:
        async with client(get_settings()) as c:
            await pull_model(c, event, timeout, wait)

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

    try:
        ModelPushRequested(job_id=job_id, repo_id=repo_id, private=not public)
    except ValidationError as e:
        fail(describe(e))

    async def go() -> None:
        async with client(get_settings()) as c:
            await request_push(c, job_id, repo_id, private=not public, timeout=timeout)

    run(go())


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
@hyperparameter_options
def tune(
    model: str = typer.Option(..., "--model", help="base model repo id"),
    dataset: str = typer.Option(..., "--dataset", help="dataset id (see `codetune dataset list`)"),
    name: str | None = typer.Option(None, help="Ollama model name to publish as"),
    revision: str = typer.Option("main"),
    no_export: bool = typer.Option(False, help="do not export/serve after training"),
    eval_dataset: str | None = typer.Option(None, help="dataset id of held-out rows for the evaluation report"),
    gate: bool = typer.Option(True, help="publish only if the evaluation report passes the quality gate"),
    wait: bool = typer.Option(False, help="follow progress until the job ends"),
    hyperparameters: Hyperparameters = ...,  # type: ignore[assignment]  # the options of every field, --config
) -> None:
    """Request a LoRA fine-tuning job (`tuning.requested`)."""
    from events.payloads import TuningRequested

    try:
        event = TuningRequested(job_id=new_job_id(), base_model=model, revision=revision, dataset_id=dataset,
                                name=name, hyperparameters=hyperparameters, eval_dataset_id=eval_dataset,
                                export=None if no_export else {"gate": gate})  # type: ignore[arg-type]
    except ValidationError as e:
        fail(describe(e))
    run(submit_job(get_settings(), event, wait))


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
        if k in ("report", "eval_loss"):
            continue
        if k == "loss":  # labelled: the last step's, the mean of the last 10, the evaluation's
            for label, value in job_losses(doc).items():
                table.add_row(label, value)
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
    from handlers.report import of_job

    report = of_job(doc)
    if report is None:
        console.print("[dim]no evaluation report yet[/dim]")
        return
    print_report(report)


@job_app.command("list")
def job_list(limit: int = 20) -> None:
    """List recent jobs."""

    async def go() -> list[Any]:
        from storage.documents import TuningJob

        async with database(get_settings()):
            return await TuningJob.find_all().sort("-created_at").limit(limit).to_list()

    table = Table("job_id", "status", "base model", "dataset", "step", "loss", "loss(avg10)", "eval_loss", "created")
    for j in run(go()):
        table.add_row(j.job_id, j.status, j.base_model, j.dataset_id, f"{j.step}/{j.max_steps}",
                      *job_losses(j).values(), str(j.created_at)[:19])
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
    except ValidationError as e:
        fail(describe(e))
    except CodeTuneError as e:
        fail(e.message)
    run(submit_job(get_settings(), event, wait))


# ------------------------------------------------------------------ dead letters


@dlq_app.command("list")
def dlq_list(
    limit: int = typer.Option(20, help="how many letters to show (latest first)"),
    subject: str = typer.Option("", help="only letters for this original subject (NATS wildcards allowed)"),
) -> None:
    """Show the latest dead-lettered messages: stream sequence, time, subject, deliveries and reason."""
    run(list_dead_letters(get_settings(), limit, subject))


@dlq_app.command("show")
def dlq_show(seq: int) -> None:
    """Print one dead letter in full (the body decoded where it is text)."""
    run(show_dead_letter(get_settings(), seq))


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
    try:
        run(run_real_demo(s) if real else run_demo(s))
    finally:
        if stop_stack:
            stack.stop()
        else:
            console.print("the stack keeps running: `codetune stack stop` stops it")


@app.command()
@hyperparameter_options
def pipeline(
    repo_id: str = typer.Argument(..., help="base model repo id on the hub"),
    dataset: Path = typer.Option(..., "--dataset", exists=True, dir_okay=False, help="training file"),
    name: str = typer.Option(..., "--name", help="Ollama model name"),
    mode: str = typer.Option("adapter", help="adapter | merged"),
    outtype: str = typer.Option("f16", help="f16 | bf16 | q8_0"),
    quantize: str | None = typer.Option(None, help="Ollama create-time quantization, e.g. q4_K_M"),
    system: str | None = typer.Option(None, help="SYSTEM prompt for the Modelfile"),
    prompt: str = typer.Option("Hello! Who are you?", help="the one chat message sent at the end"),
    push: str | None = typer.Option(None, help="then push adapter, GGUFs, Modelfile and a model card to this hub "
                                    "repo (user/name) over model.push.requested, with the models stage's token"),
    hyperparameters: Hyperparameters = ...,  # type: ignore[assignment]  # the options of every field, --config
) -> None:
    """Upload, pull, tune, export, create the Ollama model and chat once (needs running workers)."""
    from events.payloads import ExportOptions
    from infra.pipeline import run_pipeline

    try:
        export = ExportOptions.model_validate({"mode": mode, "outtype": outtype, "quantize": quantize,
                                               "system": system})
    except ValidationError as e:
        fail(describe(e))
    run(run_pipeline(get_settings(), repo_id, dataset, name, hyperparameters, export, prompt, push))


# ------------------------------------------------------------------ contract


@app.command()
def contract() -> None:
    """Print the event contract table (subjects, payloads, producers, consumers)."""
    from handlers.contract import contract_markdown

    print(contract_markdown())


def main() -> None:
    """Run the CLI: a flow's failure is its one line and the commands that show more; any other error is one
    line too (with its traceback under -v)."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except FlowError as e:
        console.print(f"[red]error:[/red] {escape(e.message)}", highlight=False, soft_wrap=True)
        for hint in e.hints:
            console.print(f"  more: [bold]{hint}[/bold]", highlight=False, soft_wrap=True)
        sys.exit(e.code)
    except Exception as e:
        if loudness.verbose():
            raise
        console.print(f"[red]error:[/red] {type(e).__name__}: {escape(next(iter(str(e).splitlines()), ''))}  "
                      "[dim](`codetune -v …` shows the traceback)[/dim]", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
