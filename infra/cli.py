"""`codetune` — the command line. Every command talks to the stages through events (events.client)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from infra.settings import Settings, get_settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
stack_app = typer.Typer(no_args_is_help=True, help="The embedded local stack (NATS, MongoDB-wire, S3).")
dataset_app = typer.Typer(no_args_is_help=True, help="Upload and list training datasets.")
dlq_app = typer.Typer(no_args_is_help=True, help="Inspect dead-lettered messages.")
app.add_typer(stack_app, name="stack")
app.add_typer(dataset_app, name="dataset")
app.add_typer(dlq_app, name="dlq")
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


@contextlib.asynccontextmanager
async def database(settings: Settings) -> AsyncIterator[None]:
    from storage.db import init_db

    mongo = await init_db(settings)
    try:
        yield
    finally:
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


async def _provision(s: Settings) -> None:
    from events.streams import provision

    async with client(s) as c:
        await provision(c.js)


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


# ------------------------------------------------------------------ workers


@app.command()
def worker(stages: list[str] = typer.Argument(None, help="stages to run (default: all)")) -> None:
    """Run stage handlers in this process. Start several to scale out: they share durable consumers."""
    import logging

    os.environ["CODETUNE_BUILD_APP"] = "0"
    from handlers.app import build_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    application = build_app(stages or None)
    asyncio.run(application.run())


# ------------------------------------------------------------------ datasets


@dataset_app.command("upload")
def dataset_upload(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, readable=True),
    name: str | None = typer.Option(None, help="name to record (default: the file name)"),
    fmt: str = typer.Option("auto", "--format", help="auto | text | alpaca | chat"),
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
    from handlers.datasets.service import store_upload
    from storage.objects import ObjectStore

    store = ObjectStore(s)
    await store.ensure_bucket()
    with open(file, "rb") as f:
        event = await store_upload(store, f, name or file.name, fmt=fmt)
    async with client(s) as c, c.subscribe([sj.DATASET_VALIDATED, sj.DATASET_FAILED]) as q:
        pub = await c.publish(event)
        console.print(f"uploaded [bold]{file.name}[/bold] → s3://{s.s3_bucket}/{event.key}  "
                      f"dataset_id=[bold]{event.dataset_id}[/bold] event={pub.id}")
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


# ------------------------------------------------------------------ dead letters


@dlq_app.command("list")
def dlq_list(limit: int = 20) -> None:
    """Show the latest dead-lettered messages with their reasons."""
    run(_dlq(get_settings(), limit))


async def _dlq(s: Settings, limit: int) -> None:
    from events.streams import DEAD_LETTERS

    async with client(s) as c:
        info = await c.js.stream_info(DEAD_LETTERS.name)
        last = info.state.last_seq
        table = Table("seq", "subject", "code", "reason", "body")
        for seq in range(last, max(info.state.first_seq, last - limit + 1) - 1, -1):
            if seq <= 0:
                break
            with contextlib.suppress(Exception):
                m = await c.js.get_msg(DEAD_LETTERS.name, seq)
                d = json.loads(m.data or b"{}")
                table.add_row(str(seq), d.get("subject", ""), d["reason"]["code"], d["reason"]["message"][:80],
                              d.get("body", "")[:40])
        console.print(table)


# ------------------------------------------------------------------ demo


@app.command()
def demo(stop_stack: bool = typer.Option(False, help="stop the local stack afterwards")) -> None:
    """Run the main job end to end on the embedded local stack (started if needed)."""
    from infra.demo import run_demo
    from infra.stack import LocalStack, StackError

    s = get_settings()
    stack = LocalStack(s)
    try:
        stack.start()
    except StackError as e:
        fail(str(e))
    try:
        run(run_demo(s))
    finally:
        if stop_stack:
            stack.stop()
        else:
            console.print("the stack keeps running: `codetune stack stop` stops it")


# ------------------------------------------------------------------ contract


@app.command()
def contract() -> None:
    """Print the event contract table (subjects, payloads, producers, consumers)."""
    from events.subjects import contract_markdown

    print(contract_markdown())


def register(extra: Callable[[typer.Typer], None]) -> None:
    extra(app)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
