"""The command line's reusable flows: connect, upload a dataset, submit and follow a job, push, read dead
letters — and how their numbers are rendered.

`infra/cli.py` (thin Typer commands), `infra/pipeline.py` and `infra/demo.py` all use these; none of them
imports the CLI. A flow that ends short of its goal raises `FlowError`: one line saying why, and the
commands that show more (`codetune job show ID`, `codetune dlq show SEQ`); the CLI prints exactly that and
exits non-zero.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from core import tracing
from core.settings import Settings
from events import subjects as sj
from events.payloads import (
    ErrorInfo,
    ModelPulled,
    ModelPullRequested,
    ModelPushed,
    ModelPushRequested,
    TrainMetrics,
    TuningProgress,
)
from infra.console import console


class FlowError(RuntimeError):
    """A flow ended short of its goal. `message`: why, in one line; `hints`: commands that show more;
    `code`: the exit status (2: the job or the dataset failed, as `tune --wait` and `dataset upload` always
    exited; 1: anything else — refused input, an unreachable service, a later stage's failure)."""

    def __init__(self, message: str, hints: Sequence[str] = (), code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.hints = list(hints)
        self.code = code


def failure_hints(error: ErrorInfo, *commands: str) -> list[str]:
    """The commands that show more about a failure: the caller's, then its dead letter if it has one."""
    seq = getattr(error, "dead_letter_seq", None)
    return [*commands, *([f"codetune dlq show {seq}"] if seq else [])]


# ------------------------------------------------------------------ connections


@contextlib.asynccontextmanager
async def client(settings: Settings) -> AsyncIterator[Any]:
    from events.client import CodeTuneClient

    try:
        c = await CodeTuneClient.connect(settings, source="codetune/cli")
    except Exception as e:
        raise FlowError(f"cannot reach NATS at {settings.nats_url} ({type(e).__name__}); is the stack running?",
                        ["codetune stack start"]) from None
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


# ------------------------------------------------------------------ datasets


async def upload_dataset(s: Settings, file: Path, name: str | None, fmt: str, wait: bool, timeout: float
                         ) -> tuple[str, Any] | None:
    """Stream FILE to the bucket, publish `dataset.uploaded`; with `wait`, print and return the verdict. The same
    bytes (same format) uploaded before are that dataset, with its verdict: nothing is stored twice."""
    from events.envelope import derived_id
    from handlers.datasets.service import answer_of, settle_upload, store_upload
    from storage.objects import ObjectStore

    store = ObjectStore(s)
    await store.ensure_bucket()
    with open(file, "rb") as f:
        stored = await store_upload(store, f, name or file.name, fmt=fmt)
    async with client(s) as c, c.subscribe([sj.DATASET_VALIDATED, sj.DATASET_FAILED]) as q, database(s):

        async def announce(ev: Any) -> str:
            return (await c.publish(ev, event_id=derived_id(ev.dataset_id, sj.DATASET_UPLOADED))).id

        settled = await settle_upload(store, stored, announce)
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
    if subject == sj.DATASET_VALIDATED:
        p = answer.profile
        console.print(f"[green]validated[/green] {answer.dataset_id}: format={p.format} rows={p.rows} "
                      f"≈{p.tokens_estimate} tokens ({p.bytes} bytes)" + (f" roles={p.roles}" if p.roles else ""))
    else:
        console.print(f"[red]failed[/red] {answer.dataset_id}: {answer.error.message}", markup=False)
        for le in answer.line_errors:
            console.print(f"  line {le.line}: {le.message}", markup=False)


def dataset_failure(answer: Any, file: Path) -> FlowError:
    """`dataset.failed` as a FlowError (its line errors are already printed by `print_dataset_answer`)."""
    return FlowError(f"dataset {file.name} failed validation: {answer.error.code}: {answer.error.message}",
                     failure_hints(answer.error, "codetune dataset list --json"), code=2)


async def list_datasets(s: Settings) -> list[dict[str, Any]]:
    from storage.documents import Dataset

    async with database(s):
        docs = await Dataset.find_all().sort("-created_at").to_list()
    return [d.model_dump(exclude={"id"}) for d in docs]


# ------------------------------------------------------------------ base models


async def pull_model(c: Any, event: ModelPullRequested, timeout: float, wait: bool = True) -> ModelPulled | None:
    """Publish `model.pull.requested`; with `wait`, print and return `model.pulled` (a failure raises)."""
    async with c.subscribe([sj.MODEL_PULLED, sj.MODEL_PULL_FAILED]) as q:
        await c.publish(event)
        console.print(f"requested {event.repo_id}@{event.revision}")
        if not wait:
            return None
        subject, answer = await c.wait_for(
            q, lambda _, d: d["repo_id"] == event.repo_id and d.get("revision") == event.revision, timeout)
    if subject != sj.MODEL_PULLED:
        raise FlowError(f"base model {event.repo_id}@{event.revision} was not pulled: {answer.error.code}: "
                        f"{answer.error.message}", failure_hints(answer.error, "codetune model list"))
    console.print(f"[green]pulled[/green] {event.repo_id}@{answer.sha[:12]}: {answer.files} files, "
                  f"{answer.bytes / 1e6:.1f} MB → {answer.prefix}")
    return answer


# ------------------------------------------------------------------ jobs



async def submit_job(s: Settings, event: Any, wait: bool, timeout: float = 24 * 3600) -> Any:
    """Publish `tuning.requested`, say where the job stands; with `wait`, follow it to its end (the
    `tuning.completed` event; a failure or cancellation raises FlowError)."""
    async with client(s) as c, c.subscribe(
        [sj.progress_subject(event.job_id), sj.TUNING_COMPLETED, sj.TUNING_FAILED, sj.TUNING_CANCELLED]
    ) as q:
        with tracing.span("codetune tune", job_id=event.job_id):  # the job's trace starts here (tracing on)
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


def _num(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"


def progress_fields(ev: TuningProgress, eval_loss: float | None) -> dict[str, str]:
    """The bar's numbers: `loss` is the last step's, `eval_loss` the latest evaluation's."""
    return {"status": ev.status, "steps": f"{ev.step}/{ev.max_steps}" if ev.max_steps else "-",
            "loss": _num(ev.loss), "eval_loss": _num(eval_loss),
            "tps": f"{ev.tokens_per_s:.0f}" if ev.tokens_per_s else "-"}


def summary_line(job_id: str, m: TrainMetrics, adapter_key: str) -> str:
    """`loss` is the first step's, `loss(avg10)` the mean of the last ≤10 steps (what `train_loss` is)."""
    return (f"[green]succeeded[/green] {job_id}: {m.steps} steps, loss {_num(m.first_loss)} (first step) → "
            f"loss(avg10) {_num(m.train_loss)}, eval_loss {_num(m.eval_loss)}, {m.tokens_per_s:.0f} tok/s; "
            f"adapter {adapter_key}")


def job_losses(job: Any) -> dict[str, str]:
    """A job document's numbers, labelled: `loss` the last step's, `loss(avg10)` the mean of the last ≤10
    steps (a finished job's `train_loss`), `eval_loss` the latest (or best, when early stopping kept it)."""
    metrics = job.metrics or {}
    if metrics:  # finished: the document's `loss` is train_loss; the last step's is the history's last point
        last = next((p.get("loss") for p in reversed(job.loss_history or []) if p.get("loss") is not None), None)
        avg = metrics.get("train_loss")
    else:  # running: the document's `loss` is the last step's, as progress reported it
        last, avg = job.loss, None
    return {"loss": _num(last), "loss(avg10)": _num(avg), "eval_loss": _num(job.eval_loss)}


def print_report(report: Any) -> None:
    """An evaluation report card (README "Evaluation report and quality gate") as Markdown."""
    from rich.markdown import Markdown

    from handlers.report import render_markdown

    console.print(Markdown(render_markdown(report)))


async def follow_job(c: Any, q: Any, job_id: str, timeout: float) -> Any:
    """Render progress events as a live bar until the job's terminal event; return `tuning.completed`,
    raise FlowError (the reason, `codetune job show ID`, its dead letter) when it failed or was cancelled."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    terminal = {sj.TUNING_COMPLETED, sj.TUNING_FAILED, sj.TUNING_CANCELLED}
    eval_loss: float | None = None
    with Progress(TextColumn("[bold]{task.fields[status]}"), BarColumn(), TextColumn("{task.fields[steps]}"),
                  TextColumn("loss {task.fields[loss]}"), TextColumn("eval_loss {task.fields[eval_loss]}"),
                  TextColumn("{task.fields[tps]} tok/s"), TimeRemainingColumn(), console=console,
                  transient=False) as bar:
        task = bar.add_task("train", total=None, status="queued", steps="-", loss="-", eval_loss="-",
                            tps="-")
        while True:
            subject, ev = await c.wait_for(q, lambda s, d: d.get("job_id") == job_id, timeout)
            if subject in terminal:
                break
            eval_loss = ev.eval_loss if ev.eval_loss is not None else eval_loss
            bar.update(task, total=ev.max_steps or None, completed=ev.step, **progress_fields(ev, eval_loss))
            if ev.message and ev.status == "waiting":
                bar.console.print(f"[yellow]{ev.message}[/yellow]")
            elif ev.message and ev.message.startswith(("dataset lint:", "estimate:")):
                bar.console.print(ev.message)
    if subject == sj.TUNING_COMPLETED:
        console.print(summary_line(job_id, ev.metrics, ev.adapter_key))
        return ev
    if subject == sj.TUNING_FAILED:
        raise FlowError(f"job {job_id} failed: {ev.error.code}: {ev.error.message}",
                        failure_hints(ev.error, f"codetune job show {job_id}"), code=2)
    raise FlowError(f"job {job_id} was cancelled at step {ev.step}", [f"codetune job show {job_id}"], code=2)


async def request_push(c: Any, job_id: str, repo_id: str, private: bool = True,
                       timeout: float = 3600) -> ModelPushed:
    """`model.push.requested` for a finished job, answered by the models stage (which holds the HF token)."""
    subject, answer = await c.publish_and_wait(
        ModelPushRequested(job_id=job_id, repo_id=repo_id, private=private), [sj.MODEL_PUSHED, sj.MODEL_PUSH_FAILED],
        lambda _, d: d.get("job_id") == job_id and d.get("repo_id") == repo_id, timeout)
    if subject != sj.MODEL_PUSHED:
        raise FlowError(f"push failed: {answer.error.code}: {answer.error.message}",  # type: ignore[attr-defined]
                        failure_hints(answer.error, f"codetune job show {job_id}"))  # type: ignore[attr-defined]
    assert isinstance(answer, ModelPushed)
    console.print(f"[green]pushed[/green] to {repo_id}: {answer.commit_url or repo_id} ({len(answer.files)} files)")
    return answer


# ------------------------------------------------------------------ dead letters


async def list_dead_letters(s: Settings, limit: int, subject: str = "") -> None:
    """Print the latest dead letters (newest first): sequence, time, subject, deliveries, reason."""
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
                if subject and not subject_matches(wanted, m.subject or ""):
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


def subject_matches(pattern: str, subject: str) -> bool:
    p, t = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(t) > i
        if i >= len(t) or (tok != "*" and tok != t[i]):
            return False
    return len(p) == len(t)


async def show_dead_letter(s: Settings, seq: int) -> None:
    """Print one dead letter in full (the body decoded where it is text)."""
    from events.streams import DEAD_LETTERS

    async with client(s) as c:
        try:
            m = await c.js.get_msg(DEAD_LETTERS.name, seq)
        except Exception as e:
            raise FlowError(f"no dead letter with sequence {seq}: {e}", ["codetune dlq list"]) from None
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
