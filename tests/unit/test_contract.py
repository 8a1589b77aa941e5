"""The contract lives only in events/: the README's table is generated from it and must not drift."""

import re
from pathlib import Path

from events import subjects as sj
from events.payloads import Payload
from events.streams import CONSUMERS

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_contract_table_matches_the_code() -> None:
    text = README.read_text()
    block = re.search(r"<!-- contract:start -->\n(.*?)\n<!-- contract:end -->", text, re.S)
    assert block, "README lacks the contract markers"
    assert block.group(1).strip() == sj.contract_markdown().strip(), "run: codetune contract"


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
