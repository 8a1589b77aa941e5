"""Who emits and consumes each subject of the contract, read from the stages' own declarations.

events/subjects.py says what each subject carries and which outside parties (CLI, bridge, operators)
use it; the stages say the rest in code: a subscriber of a stage's router consumes its subject, a
publisher (declared with `handlers.common.Outputs`) emits it, and a declaration's `description` is the
note shown beside the stage ("tuning (waiting jobs)"). From both come the README's contract table
(`codetune contract`) and the NATS users' permissions (infra/natsauth.py).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import cache

from events import subjects as sj
from handlers.app import STAGES


@dataclass(frozen=True)
class Party:
    stage: str
    note: str | None = None

    def __str__(self) -> str:
        return f"{self.stage} ({self.note})" if self.note else self.stage


@dataclass(frozen=True)
class Parties:
    """The stages that emit and consume one contract subject (in STAGES order)."""

    emitters: tuple[Party, ...] = field(default=())
    consumers: tuple[Party, ...] = field(default=())


def _note(endpoint: object) -> str | None:
    """The declaration's own `description=` (not a docstring FastStream would fall back to)."""
    return getattr(endpoint.specification.config, "description_", None)  # type: ignore[attr-defined]


@cache
def declarations() -> tuple[tuple[str, str, str, str | None], ...]:
    """Every stage's declared endpoints: `(stage, "emits" | "consumes", subject as declared, note)`."""
    out: list[tuple[str, str, str, str | None]] = []
    for stage, module in STAGES.items():
        router = importlib.import_module(module).router
        out += [(stage, "consumes", sub.subject.template, _note(sub)) for sub in router.subscribers]
        out += [(stage, "emits", pub.subject.template, _note(pub)) for pub in router.publishers]
    return tuple(out)


@cache
def parties() -> dict[str, Parties]:
    """Contract subject (as `events.subjects.CONTRACT` spells it) → the stages that emit and consume it.
    KeyError when a stage declares a subject the contract lacks."""
    found: dict[str, dict[str, dict[str, str | None]]] = {
        spec.subject: {"emits": {}, "consumes": {}} for spec in sj.CONTRACT}
    for stage, role, subject, note in declarations():
        seen = found[sj.spec_for(subject).subject][role]  # `tuning.progress.{job_id}` → `tuning.progress.<job_id>`
        if seen.get(stage) is None:  # the first declaration with a note wins (dlq.<subject>: one per consumer)
            seen[stage] = note
    return {
        subject: Parties(emitters=tuple(Party(st, n) for st, n in roles["emits"].items()),
                         consumers=tuple(Party(st, n) for st, n in roles["consumes"].items()))
        for subject, roles in found.items()
    }


def _cell(stages: tuple[Party, ...], outside: str) -> str:
    if len(stages) == len(STAGES) and not any(p.note for p in stages):
        named = ["every stage"]
    else:
        named = [str(p) for p in stages]
    return ", ".join([*named, *([outside] if outside else [])]) or "—"


def contract_markdown() -> str:
    """The README's contract table (between its `contract:start` / `contract:end` markers)."""
    rows = ["| subject | kind | payload | emitted by | consumed by | meaning |", "|---|---|---|---|---|---|"]
    found = parties()
    for s in sj.CONTRACT:
        who = found[s.subject]
        rows.append(f"| `{s.subject}` | {s.kind} | `{s.payload.__name__}` | {_cell(who.emitters, s.clients_emit)} "
                    f"| {_cell(who.consumers, s.clients_consume)} | {s.meaning} |")
    return "\n".join(rows)
