"""The quality gate's decisions on reports (plain function; the pipeline tests run it on real jobs)."""

from __future__ import annotations

from core.settings import Settings
from events.payloads import EvalSample, EvalScores, EvaluationReport, RuntimeCheck
from handlers.export.gate import decide
from handlers.report import lint_warnings, render_markdown

SETTINGS = Settings(_env_file=None)


def report(**changes: object) -> EvaluationReport:
    sample = EvalSample(prompt="What is the capital of Peru?", reference="Lima.", base="x", tuned="Lima.",
                        base_stopped=False, tuned_stopped=True, tuned_tokens=3, tuned_ids=[5, 6])
    runtime = RuntimeCheck(prompt=sample.prompt, answer="Lima.", finish_reason="stop", stopped=True, tokens=3,
                           budget=64, expected="Lima.", agree_tokens=2, compared_tokens=2)
    base = EvaluationReport(job_id="ftjob-gate1", base_model="org/model", source="validation", rows=3,
                            base=EvalScores(loss=3.0, token_accuracy=0.1, tokens=30),
                            tuned=EvalScores(loss=1.0, token_accuracy=0.7, tokens=30), samples=[sample],
                            runtime=runtime)
    return base.model_copy(update=changes)


def test_a_report_that_learned_stops_and_agrees_passes() -> None:
    gate = decide(report(), SETTINGS, True)
    assert gate.passed and gate.enabled and not gate.reasons
    assert gate.thresholds["min_loss_improvement"] == 0.02 and gate.thresholds["require_stop"] is True


def test_each_failed_check_is_a_reason() -> None:
    r = report(tuned=EvalScores(loss=2.99, token_accuracy=0.1, tokens=30))
    assert any("not below the base's 3.0000 by 2%" in w for w in decide(r, SETTINGS, True).reasons)
    never = report().runtime.model_copy(update={"stopped": False, "finish_reason": "length", "tokens": 64})
    assert any("did not stop within 64 tokens" in w for w in decide(report(runtime=never), SETTINGS, True).reasons)
    empty = report().runtime.model_copy(update={"answer": " "})
    assert any("answer is empty" in w for w in decide(report(runtime=empty), SETTINGS, True).reasons)
    differs = report().runtime.model_copy(update={"agree_tokens": 0})
    assert any("first tokens differ" in w for w in decide(report(runtime=differs), SETTINGS, True).reasons)
    broken = report().runtime.model_copy(update={"error": "RuntimeError: bad magic"})
    assert any("did not run in llama.cpp" in w for w in decide(report(runtime=broken), SETTINGS, True).reasons)
    assert any("not checked" in w for w in decide(report(runtime=None), SETTINGS, True).reasons)
    failed = report(error="OutOfMemoryError: CUDA", base=EvalScores(), tuned=EvalScores())
    assert len(decide(failed, SETTINGS, True).reasons) >= 2


def test_thresholds_come_from_settings_and_opting_out_still_records_the_verdict() -> None:
    lax = SETTINGS.model_copy(update={"gate_require_stop": False, "gate_min_loss_improvement": 0.0})
    never = report().runtime.model_copy(update={"stopped": False, "finish_reason": "length"})
    assert decide(report(runtime=never), lax, True).passed
    off = decide(report(runtime=never), SETTINGS, False)
    assert not off.enabled and not off.passed and off.reasons


def test_the_card_shows_the_numbers_the_verdict_and_lint() -> None:
    r = report(lint=lint_warnings({"warnings": [{"message": "3 rows truncated at max_seq_len"}]}))
    card = render_markdown(r.model_copy(update={"gate": decide(r, SETTINGS, True)}))
    assert "| 3.0000 | 1.0000 | -66.7% |" in card and "10.0%" in card and "70.0%" in card
    assert "Quality gate: PASSED" in card and "3 rows truncated at max_seq_len" in card
    assert lint_warnings(["duplicate rows: 2"]) == ["duplicate rows: 2"] and lint_warnings(None) == []
