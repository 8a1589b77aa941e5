"""The contract: events/ says what each subject carries; the stages' routers say who emits and consumes it.
The README's table is generated from both and must not drift; every declaration names a contract subject."""

import re
from pathlib import Path

import pytest

from events import subjects as sj
from events.payloads import Payload
from events.streams import CONSUMERS
from handlers.app import STAGES
from handlers.contract import contract_markdown, declarations, parties

README = Path(__file__).resolve().parents[2] / "README.md"
PIPELINE = {c.durable.split("-", 1)[0] for c in CONSUMERS}  # the stages with a durable consumer


def test_readme_contract_table_matches_the_code() -> None:
    text = README.read_text()
    block = re.search(r"<!-- contract:start -->\n(.*?)\n<!-- contract:end -->", text, re.S)
    assert block, "README lacks the contract markers"
    assert block.group(1).strip() == contract_markdown().strip(), "run: codetune contract"


def test_every_declared_output_is_a_contract_subject_with_its_payload() -> None:
    outputs = [(stage, subject) for stage, role, subject, _ in declarations() if role == "emits"]
    # every pipeline stage declares what it publishes; the ollama stage publishes only its replies
    assert {stage for stage, _ in outputs} == PIPELINE
    for stage, subject in outputs:
        spec = sj.spec_for(subject)  # KeyError: a stage declares a subject the contract lacks
        assert spec.kind in {"command", "fact"}, (stage, subject)
    # each stage dead-letters its own consumers' messages (a durable is named after its stage), and says so
    declared = {(stage, subject) for stage, role, subject, _ in declarations() if role == "emits"}
    for c in CONSUMERS:
        stage = c.durable.split("-", 1)[0]
        assert (stage, sj.dead_letter_subject(c.subject)) in declared, c.durable


def test_every_fact_and_command_has_an_emitter_and_a_consumer() -> None:
    found = parties()
    for spec in sj.CONTRACT:
        who = found[spec.subject]
        assert who.emitters or spec.clients_emit, f"nobody emits {spec.subject}"
        assert who.consumers or spec.clients_consume, f"nobody consumes {spec.subject}"


def test_the_stage_answers_are_declared_by_the_stage_that_computes_them() -> None:
    found = parties()
    emitters = {spec: {p.stage for p in who.emitters} for spec, who in found.items()}
    assert emitters[sj.DATASET_VALIDATED] == emitters[sj.DATASET_FAILED] == {"datasets"}
    assert emitters[sj.TUNING_PROGRESS + ".<job_id>"] == {"tuning"}
    assert emitters[sj.TUNING_FAILED] == {"intake", "tuning"}  # intake: a malformed request names its job
    assert emitters[sj.MODEL_EXPORTED] == {"export"} and emitters[sj.MODEL_PUBLISHED] == {"serving"}
    assert emitters[sj.DEAD_LETTER + ".<subject>"] == PIPELINE == set(STAGES) - {"ollama"}
    assert not emitters[sj.DATASET_UPLOADED]  # only outside parties upload


def test_the_ollama_requests_are_answered_by_the_ollama_stage_alone() -> None:
    """serving consumes only its durable consumer (it can scale to zero); the ollama stage only requests."""
    consumed = {(stage, sj.spec_for(subject).kind) for stage, role, subject, _ in declarations() if role == "consumes"}
    assert {stage for stage, kind in consumed if kind == "request-reply"} == {"ollama"}
    assert {kind for stage, kind in consumed if stage == "ollama"} == {"request-reply"}
    assert ("serving", "fact") in consumed


def test_every_design_subject_has_a_versioned_payload() -> None:
    design = ["dataset.uploaded", "dataset.validated", "dataset.failed", "model.pull.requested", "model.pulled",
              "tuning.requested", "tuning.progress.job-1", "tuning.cancel.requested", "tuning.completed",
              "tuning.failed", "model.exported", "model.published", "ollama.models", "ollama.pull",
              "ollama.chat"]
    for subject in design:
        payload = sj.payload_for(subject)
        assert "v" in payload.model_fields or not issubclass(payload, Payload), subject


def test_every_consumed_subject_is_in_the_contract() -> None:
    for c in CONSUMERS:
        assert sj.spec_for(c.subject).kind in {"command", "fact"}


def test_a_stage_publishes_only_what_it_declares() -> None:
    from handlers.datasets.router import outputs as datasets
    from handlers.tuning.router import outputs as tuning

    assert datasets.publisher(sj.DATASET_VALIDATED) is datasets.publishers[sj.DATASET_VALIDATED]
    with pytest.raises(RuntimeError, match="does not declare"):
        datasets.publisher(sj.MODEL_PULLED)  # a forged fact would also be refused by its NATS user
    # one declared publisher covers every job's progress subject
    assert tuning.publisher(sj.progress_subject("job-1")) is tuning.publishers[sj.TUNING_PROGRESS + ".{job_id}"]
