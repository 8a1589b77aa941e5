"""The NATS permission model, derived from the contract: the stages' declared publishers and subscribers
(handlers/contract.py) and the outside parties events/subjects.py names.

Users (one per role):
- `admin`: provisions streams and consumers; may do everything.
- `client`: the CLI, the bridge and any outside publisher. Publishes only what the contract says outside
  publishers emit (the commands, `dataset.uploaded`, the `ollama.*` requests), subscribes to the facts
  (progress and dead letters included) and its `_INBOX` replies; reads JetStream but cannot delete,
  purge or reconfigure the product's streams, nor create the stages' durable consumers.
- one user per stage (`datasets`, `intake`, `models`, `tuning`, `export`, `serving`, `ollama`): publishes only the
  facts that stage emits, dead letters, acks and its pull-consumer API calls. `ollama` answers core-NATS
  requests only: it emits no fact and acks nothing, so it publishes just its replies (`_INBOX.>`) and the
  JetStream API calls every worker's start makes (the check that streams and consumers are as defined).
- `stages`: the union of every stage, for a process that runs several stages (the demo, the tests).

`render_conf()` writes the `authorization` block of a nats-server config: with literal passwords for the
local stack, or with `$CODETUNE_NATS_<ROLE>_PASSWORD` environment references for the deploy manifests
(`python -m infra.natsauth` prints that form; infra/deploy/nats-auth.conf is it, checked by a test).
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

from events import subjects as sj
from events.streams import CONSUMERS, STREAMS
from handlers.app import STAGES as STAGE_MODULES
from handlers.contract import parties

STAGES: tuple[str, ...] = tuple(STAGE_MODULES)
ROLES: tuple[str, ...] = ("admin", "client", "stages", *STAGES)
INBOX = "_INBOX.>"
JS_API = "$JS.API.>"
JS_ACK = "$JS.ACK.>"
WEBHOOK_RECEIPTS = "CODETUNE_WEBHOOKS"  # the bridge's idempotency KV bucket (handlers/bridge/receipts.py)


def _pattern(subject: str) -> str:
    """`tuning.progress.<job_id>` → `tuning.progress.>`."""
    head, sep, _ = subject.partition(".<")
    return head + ".>" if sep else subject


def emits(role: str) -> list[str]:
    """The subject patterns `role` publishes: a stage's declared outputs; the client's, what outside parties
    emit according to the contract."""
    if role == "client":
        return sorted({_pattern(s.subject) for s in sj.CONTRACT if s.clients_emit})
    found = parties()
    return sorted({_pattern(s.subject) for s in sj.CONTRACT if role in {p.stage for p in found[s.subject].emitters}})


def consumes(role: str) -> list[str]:
    """The subject patterns `role` reads: a stage's subscribers; the client's, what outside parties read."""
    if role == "client":
        return sorted({_pattern(s.subject) for s in sj.CONTRACT if s.clients_consume})
    found = parties()
    return sorted({_pattern(s.subject) for s in sj.CONTRACT if role in {p.stage for p in found[s.subject].consumers}})


def _guarded_js_api() -> list[str]:
    """JetStream API calls no role but admin may make: nothing deleted, purged or reconfigured."""
    deny = ["$JS.API.STREAM.DELETE.>", "$JS.API.STREAM.PURGE.>", "$JS.API.STREAM.MSG.DELETE.>",
            "$JS.API.CONSUMER.DELETE.>"]
    for cfg in STREAMS:
        deny += [f"$JS.API.STREAM.CREATE.{cfg.name}", f"$JS.API.STREAM.UPDATE.{cfg.name}"]
    return deny


def permissions(role: str) -> dict[str, Any]:
    if role not in ROLES:
        raise ValueError(f"unknown NATS role {role!r}; choose from {', '.join(ROLES)}")
    if role == "admin":
        return {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}}
    if role == "client":
        deny = _guarded_js_api()
        for c in CONSUMERS:  # a client must not create or redefine a stage's durable consumer
            api = f"$JS.API.CONSUMER.CREATE.{c.stream}.{c.durable}"
            deny += [api, api + ".>", f"$JS.API.CONSUMER.DURABLE.CREATE.{c.stream}.{c.durable}"]
        facts = sorted({_pattern(s.subject) for s in sj.CONTRACT if s.kind == "fact"})
        return {
            "publish": {"allow": [*emits("client"), f"$KV.{WEBHOOK_RECEIPTS}.>", JS_API, INBOX], "deny": deny},
            "subscribe": {"allow": [*facts, INBOX]},
        }
    stages = STAGES if role == "stages" else (role,)
    pub = sorted({x for st in stages for x in emits(st)})
    sub = sorted({x for st in stages for x in consumes(st)})
    streamed = any(s.kind != "request-reply" and _pattern(s.subject) in sub for s in sj.CONTRACT)
    acks = [JS_ACK] if streamed else []  # a request-reply-only stage (ollama) has no message to ack
    return {
        "publish": {"allow": [*pub, *acks, JS_API, INBOX], "deny": _guarded_js_api()},
        "subscribe": {"allow": [*sub, INBOX]},
    }


def password_env(role: str) -> str:
    return f"CODETUNE_NATS_{role.upper()}_PASSWORD"


def _value(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return json.dumps(v)


def render_conf(passwords: dict[str, str] | None = None) -> str:
    """The nats-server `authorization` block; `passwords=None` references environment variables."""
    lines = ["# CodeTune's NATS users and permissions (generated by infra/natsauth.py; do not edit by hand)",
             "authorization {", "  users = ["]
    for role in ROLES:
        pw = json.dumps(passwords[role]) if passwords is not None else "$" + password_env(role)
        lines.append(f"    {{user: {json.dumps(role)}, password: {pw},")
        lines.append(f"     permissions: {_value(permissions(role))}}}")
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


def ensure_passwords(path: Path, given: dict[str, str | None]) -> dict[str, str]:
    """Every role's password: the given one, else the one stored in `path`, else a new random one.
    The file (mode 0600) is rewritten when it changes, so clients on this host pick the passwords up."""
    stored: dict[str, str] = {}
    if path.is_file():
        try:
            stored = {k: v for k, v in json.loads(path.read_text()).items() if isinstance(v, str)}
        except ValueError:
            stored = {}
    out = {role: given.get(role) or stored.get(role) or secrets.token_urlsafe(24) for role in ROLES}
    if out != stored:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.touch(mode=0o600)
        tmp.chmod(0o600)
        tmp.write_text(json.dumps(out, indent=2))
        tmp.replace(path)
    path.chmod(0o600)
    return out


if __name__ == "__main__":
    print(render_conf(), end="")
