"""Small pure pieces: keys cannot escape, the envelope, settings compatibility and secrecy."""

import json

import pytest

from core.errors import InvalidPayloadError, UnsafeKeyError
from core.keys import check_key
from core.settings import Settings
from events.envelope import ce_headers, derived_id, unwrap
from storage import keys


@pytest.mark.parametrize("name", ["../../etc/passwd", "/abs/path.txt", "..", "a\\..\\b.txt", "\x00evil", ""])
def test_dataset_keys_never_escape(name: str) -> None:
    key = keys.dataset_key("ds-abc", name)
    parts = key.split("/")
    assert parts[:2] == ["datasets", "ds-abc"] and len(parts) == 3
    assert ".." not in parts and not key.startswith("/")


@pytest.mark.parametrize("key", ["/etc/passwd", "datasets/../x", "datasets//x", "a/b c", "a/./b"])
def test_keys_from_events_are_checked(key: str) -> None:
    with pytest.raises(UnsafeKeyError):
        check_key(key)


def test_unwrap_accepts_bare_binary_and_structured_cloudevents() -> None:
    data, meta = unwrap(b'{"a": 1}')
    assert data == {"a": 1} and meta.id is None
    h = ce_headers("dataset.uploaded", "id-1", "test")
    data, meta = unwrap(b'{"a": 2}', h)
    assert data == {"a": 2} and meta.id == "id-1" and meta.type == "io.codetune.dataset.uploaded.v1"
    assert h["Nats-Msg-Id"] == "id-1"
    structured = {"specversion": "1.0", "id": "x9", "source": "gh", "type": "t", "data": {"a": 3}}
    data, meta = unwrap(json.dumps(structured).encode())
    assert data == {"a": 3} and meta.id == "x9" and meta.structured


@pytest.mark.parametrize("body", [b"", b"{nope", b"\xff\xfe"])
def test_unwrap_rejects_non_json_with_a_reason(body: bytes) -> None:
    with pytest.raises(InvalidPayloadError, match="invalid JSON"):
        unwrap(body)


def test_derived_ids_are_stable_per_parent_and_subject() -> None:
    assert derived_id("p", "dataset.validated") == derived_id("p", "dataset.validated")
    assert derived_id("p", "dataset.validated") != derived_id("p", "dataset.failed")


def test_seed_setting_names_keep_working_and_secrets_stay_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MONGODB_URI", "mongodb://db.example:27017")
    monkeypatch.setenv("MONGODB_DB", "seeddb")
    monkeypatch.setenv("HUGGINGFACE_TOKEN", "hf_" + "x" * 34)
    s = Settings(_env_file=None)
    assert s.mongodb_uri == "mongodb://db.example:27017" and s.mongodb_db == "seeddb"
    assert s.hf_token is not None and s.hf_token.get_secret_value().startswith("hf_")
    assert "hf_x" not in repr(s) and "hf_x" not in str(s.model_dump())


@pytest.mark.parametrize("stage", ["datasets", "serving", "export", "ollama"])
def test_a_light_stage_worker_never_imports_torch(stage: str) -> None:
    """The stages a supervisor wakes from zero for one message load without the training stack (export
    imports it only when it converts; bench/bench_coldstart.py checks the same of the running workers)."""
    import subprocess
    import sys

    code = ("import sys; from handlers.app import build_app; "
            f"build_app([{stage!r}]); import infra.cli; "
            "bad = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_deploy_manifests_run_commands_that_exist() -> None:
    from pathlib import Path

    import typer.main
    import yaml

    from handlers.app import STAGES
    from infra.cli import app

    cli = typer.main.get_command(app)
    root = Path(__file__).resolve().parents[2] / "infra" / "deploy" / "k8s"
    seen = 0
    for doc in (d for f in root.glob("*.yaml") for d in yaml.safe_load_all(f.read_text()) if d):
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []):
            if not c["image"].startswith(("codetune:", "codetune-")):
                continue  # third-party images (nats-server) run their own command line
            args = c["args"]
            group = cli.commands[args[0]]  # type: ignore[attr-defined]
            if args[0] == "worker":
                assert args[1] in STAGES
            elif hasattr(group, "commands"):
                assert args[1] in group.commands
            seen += 1
    assert seen >= 8
