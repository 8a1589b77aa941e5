"""The job's evaluation report: stored on the job, as JSON and as a Markdown card next to the loss plot.

The tuning stage writes the first part (base vs tuned, samples); the export stage completes it (the GGUF
runtime check and the gate) and stores it again under the same keys. Shared by both stages (and read by
the bridge and the CLI), so it lives beside them rather than inside either. No torch here.
"""

from __future__ import annotations

from typing import Any

from events.payloads import EvaluationReport
from storage import keys
from storage.documents import TuningJob
from storage.jobs import SUCCEEDED, TransitionRefusedError, set_fields
from storage.objects import ObjectStore


def lint_warnings(raw: Any) -> list[str]:
    """`TuningJob.dataset_lint` (written by the datasets lint, when present) as a list of warning lines."""
    if not raw:
        return []
    if isinstance(raw, dict):
        raw = raw.get("warnings", raw)
        if isinstance(raw, dict):
            raw = [f"{k}: {v}" for k, v in raw.items()]
    items = raw if isinstance(raw, list) else [raw]
    out = []
    for w in items[:64]:
        text = w.get("message") or w.get("code") or str(w) if isinstance(w, dict) else str(w)
        out.append(str(text)[:1000])
    return out


async def job_lint(job_id: str) -> list[str]:
    raw = await TuningJob.get_pymongo_collection().find_one({"job_id": job_id}, {"dataset_lint": 1})
    return lint_warnings((raw or {}).get("dataset_lint"))


def _f(x: float | None, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _cell(text: str | None, limit: int = 160) -> str:
    t = (text or "").replace("\r", " ").replace("\n", "⏎").replace("|", "\\|").strip()
    t = t if len(t) <= limit else t[: limit - 1] + "…"
    return f"`{t}`" if t else "*(empty)*"


def render_markdown(r: EvaluationReport) -> str:
    """A readable card: what each number is, base → tuned, sample answers, the GGUF check and the gate."""
    where = {"validation": "held-out validation rows", "eval_file": "rows of the request's eval dataset",
             "train": "training rows (the job had no validation "
             "split: these numbers show fit, not generalisation)", "none": "no rows"}[r.source]
    lines = [f"# Evaluation report — {r.job_id}", "", f"Base model `{r.base_model}`; scored on {r.rows} {where}.",
             ""]
    if r.error:
        lines += [f"**Evaluation error:** {r.error}", ""]
    delta = (r.tuned.loss - r.base.loss) / r.base.loss if r.base.loss and r.tuned.loss is not None else None
    lines += ["| | base | tuned | change |", "|---|---|---|---|",
              f"| eval loss (mean next-token cross-entropy on answer tokens) | {_f(r.base.loss)} | "
              f"{_f(r.tuned.loss)} | {_pct(delta)} |",
              f"| token accuracy (answer tokens the model ranks first) | {_pct(r.base.token_accuracy)} | "
              f"{_pct(r.tuned.token_accuracy)} | |",
              f"| answer tokens scored | {r.base.tokens} | {r.tuned.tokens} | |", ""]
    if r.samples:
        lines += ["## Sample answers (greedy, transformers)", "",
                  "| prompt | reference | base | tuned | tuned stops |", "|---|---|---|---|---|"]
        for s in r.samples:
            lines.append(f"| {_cell(s.prompt, 80)} | {_cell(s.reference, 80)} | {_cell(s.base)} | {_cell(s.tuned)} "
                         f"| {'yes' if s.tuned_stopped else 'no'} ({s.tuned_tokens} tokens) |")
        lines.append("")
    if r.runtime is not None:
        c = r.runtime
        lines += ["## Exported GGUF in llama.cpp", ""]
        if c.error:
            lines += [f"**Runtime error:** {c.error}", ""]
        lines += [f"- prompt: {_cell(c.prompt, 200)}", f"- answer: {_cell(c.answer, 400)}",
                  f"- stops: {'yes' if c.stopped else 'no'} (finish reason `{c.finish_reason}`, {c.tokens} of "
                  f"{c.budget} tokens)",
                  f"- agrees with transformers: first {c.agree_tokens} of {c.compared_tokens} tokens", ""]
    if r.lint:
        lines += ["## Dataset warnings", "", *[f"- {w}" for w in r.lint], ""]
    if r.gate is not None:
        g = r.gate
        verdict = "PASSED" if g.passed else ("FAILED" if g.enabled else "not applied (export.gate: false)")
        lines += [f"## Quality gate: {verdict}", ""]
        lines += [f"- {why}" for why in g.reasons] or ["- every check passed"]
        lines += ["", "Thresholds: " + ", ".join(f"`{k}={v}`" for k, v in g.thresholds.items()), ""]
    lines.append(f"Evaluated in {r.duration_s:.1f} s.")
    return "\n".join(lines) + "\n"


async def save(store: ObjectStore, report: EvaluationReport) -> EvaluationReport:
    """Put the JSON and the Markdown card in the bucket, then record the report on the job."""
    report = report.model_copy(update={"json_key": keys.report_json_key(report.job_id),
                                       "markdown_key": keys.report_markdown_key(report.job_id)})
    assert report.json_key and report.markdown_key
    await store.put_bytes(report.json_key, report.model_dump_json(indent=2).encode(),
                          content_type="application/json")
    await store.put_bytes(report.markdown_key, render_markdown(report).encode(), content_type="text/markdown")
    if await set_fields(report.job_id, {SUCCEEDED}, report=report.model_dump(mode="json")) is None:
        raise TransitionRefusedError(f"job {report.job_id!r} is not a succeeded job: its report is not recorded")
    return report


def of_job(job: TuningJob) -> EvaluationReport | None:
    return EvaluationReport.model_validate(job.report) if job.report else None
