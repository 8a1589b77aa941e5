"""The quality gate: a job is published to Ollama only when its evaluation report passes.

Checks (thresholds from settings, README "Evaluation report and quality gate"):
- the evaluation ran and scored held-out rows;
- tuned eval loss is at least `gate_min_loss_improvement` (a fraction) below the base's on the same rows;
- `gate_require_answers`: no tuned sample answer and not the GGUF's answer is empty;
- `gate_require_stop`: the GGUF's answer ends at an end-of-turn/stop token within `eval_max_new_tokens`;
- the GGUF reproduces at least `gate_min_agree_tokens` leading tokens of transformers' greedy answer.
`export.gate: false` records the verdict without enforcing it.
"""

from __future__ import annotations

from core.settings import Settings
from events.payloads import EvaluationReport, GateResult


def thresholds(settings: Settings) -> dict[str, float | int | bool]:
    return {"min_loss_improvement": settings.gate_min_loss_improvement, "require_stop": settings.gate_require_stop,
            "require_answers": settings.gate_require_answers, "min_agree_tokens": settings.gate_min_agree_tokens,
            "max_new_tokens": settings.eval_max_new_tokens}


def reasons(r: EvaluationReport, settings: Settings) -> list[str]:
    """Why the report fails the gate (empty: it passes)."""
    out: list[str] = []
    if r.error:
        out.append(f"the evaluation did not run: {r.error[:300]}")
    b, t = r.base.loss, r.tuned.loss
    if b is None or t is None:
        out.append("no held-out loss: the evaluation scored no answer tokens")
    else:
        need = b * (1 - settings.gate_min_loss_improvement)
        if not t < need or t >= b:
            out.append(f"tuned eval loss {t:.4f} is not below the base's {b:.4f} by "
                       f"{100 * settings.gate_min_loss_improvement:g}% (needs < {need:.4f})")
    if settings.gate_require_answers:
        empty = [i + 1 for i, s in enumerate(r.samples) if not s.tuned.strip()]
        if empty:
            out.append(f"the tuned model's answer is empty for held-out prompt(s) {empty}")
    c = r.runtime
    if c is None:
        out.append("the exported GGUF was not checked (no held-out prompt)")
        return out
    if c.error:
        out.append(f"the exported GGUF did not run in llama.cpp: {c.error[:300]}")
        return out
    if settings.gate_require_answers and not c.answer.strip():
        out.append("the exported GGUF's answer is empty")
    if settings.gate_require_stop and not c.stopped:
        out.append(f"the exported GGUF did not stop within {c.budget} tokens (finish reason {c.finish_reason!r}): "
                   "it would run on until Ollama's limit")
    need_agree = min(settings.gate_min_agree_tokens, c.compared_tokens)
    if c.agree_tokens < need_agree:
        out.append(f"the exported GGUF's first tokens differ from transformers' greedy answer "
                   f"({c.agree_tokens} of {need_agree} agree)")
    return out


def decide(r: EvaluationReport, settings: Settings, enabled: bool) -> GateResult:
    why = reasons(r, settings)
    return GateResult(enabled=enabled, passed=not why, reasons=why, thresholds=thresholds(settings))
