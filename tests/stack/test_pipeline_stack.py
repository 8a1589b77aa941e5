"""Export and serving on the real stack: tuning.completed → GGUF + Modelfile → Ollama → chat.

Ollama is the stand-in (devkit/ollama_standin.py) unless OLLAMA_HOST names a real one.
"""

from __future__ import annotations

import uuid

import pytest

from events import subjects as sj
from events.payloads import OllamaChatRequest, OllamaModelRef, TuningRequested
from infra.flows import upload_dataset
from storage import retention
from storage.documents import ServedModel, TuningJob
from tests.conftest import TINY_REPO

pytestmark = [pytest.mark.usefixtures("workers", "tuning_worker"), pytest.mark.slow]
END = [sj.MODEL_PUBLISHED, sj.MODEL_PUBLISH_FAILED, sj.MODEL_EXPORT_FAILED, sj.TUNING_FAILED]


@pytest.fixture(scope="module")
async def dataset_id(settings, tmp_path_factory) -> str:
    from devkit.tinymodel import toy_dataset

    path = toy_dataset(tmp_path_factory.mktemp("data") / "facts.jsonl", "chat", rows=32)
    _, answer = await upload_dataset(settings, path, "facts.jsonl", "auto", True, 30)
    return answer.dataset_id


# enough steps for the tiny model to learn its toy facts and to end its answers: the quality gate passes
def request(dataset_id: str, hp: dict | None = None, **export) -> TuningRequested:
    hp = hp or {}
    job_id = f"ftjob-{uuid.uuid4().hex[:12]}"
    return TuningRequested(job_id=job_id, base_model=TINY_REPO, dataset_id=dataset_id, name=f"tiny-{job_id[6:]}",
                           hyperparameters={"max_steps": 16, "learning_rate": 3e-2, "eval_steps": 8,
                                            "save_steps": 8, "max_seq_len": 128} | hp,
                           export={"system": "You are terse."} | export)


async def run_to_published(client, req: TuningRequested, timeout: float = 300) -> tuple[str, object, object]:
    async with client.subscribe([*END, sj.MODEL_EXPORTED]) as q:
        await client.publish(req)
        first, exported = await client.wait_for(q, lambda s, d: (s == sj.MODEL_EXPORTED and d["job_id"] == req.job_id)
                                                or (s in END and d.get("job_id") == req.job_id), timeout)
        if first in END:  # failed before export (e.g. the quality gate): there is no second answer
            return first, exported, exported
        subject, end = await client.wait_for(q, lambda s, d: s in END and d.get("job_id") == req.job_id, timeout)
    return subject, exported, end


async def test_adapter_export_is_published_to_ollama_and_answers_a_chat(client, store, settings, dataset_id
                                                                        ) -> None:
    req = request(dataset_id)
    subject, exported, published = await run_to_published(client, req)
    assert subject == sj.MODEL_PUBLISHED, published
    assert exported.mode == "adapter" and exported.adapter_key.endswith(".gguf")
    assert exported.model_key.startswith("gguf/codetune-test/tiny-llama/")  # cached per base model sha
    assert "<|im_end|>" in exported.stop
    modelfile = (await store.get_bytes(exported.modelfile_key)).decode()
    assert modelfile.startswith("FROM ") and "ADAPTER " in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "TEMPLATE" in modelfile and 'SYSTEM """You are terse."""' in modelfile
    for key in (exported.model_key, exported.adapter_key):
        assert (await store.get_bytes(key))[:4] == b"GGUF"

    names = [m["model"] if "model" in m else m["name"] for m in await client.request(sj.OLLAMA_MODELS, {})]
    assert any(n.startswith(req.name) for n in names)
    shown = await client.request(sj.OLLAMA_SHOW, OllamaModelRef(model=req.name))
    assert "<|im_end|>" in str(shown.get("parameters", ""))
    reply = await client.request(sj.OLLAMA_CHAT, OllamaChatRequest(
        model=req.name, messages=[{"role": "user", "content": "What is the capital of France?"}],
        options={"num_predict": 16}), timeout=120)
    assert isinstance(reply["message"]["content"], str) and reply["message"]["content"].strip()
    # how the answer ended, as Ollama reports it: cut off at num_predict ("length") or ended its turn ("stop")
    assert reply["done_reason"] in ("stop", "length") and 0 < reply["eval_count"] <= 16
    assert (reply["done_reason"] == "length") == (reply["eval_count"] == 16) and reply["prompt_eval_count"] > 0
    doc = await TuningJob.find_one(TuningJob.job_id == req.job_id)
    assert doc.stage == "published" and doc.artifacts["adapter_gguf"] == exported.adapter_key
    # retention: the job's local files (scratch, GGUF copies) and its checkpoints are gone once Ollama has the
    # model; the final adapter and the export stay in the bucket
    assert [d for d in retention.job_dirs(settings, req.job_id) if d.exists()] == []
    assert await store.list(f"jobs/{req.job_id}/checkpoints/") == []
    assert await store.list(f"jobs/{req.job_id}/adapter/") and await store.exists(exported.adapter_key)

    # the original's /ollama/create: the exported Modelfile, FROM/ADAPTER pointing at the bucket keys
    modelfile = modelfile.replace(f"FROM {exported.model_key.rsplit('/', 1)[1]}", f"FROM {exported.model_key}")
    modelfile = modelfile.replace(f"ADAPTER {exported.adapter_key.rsplit('/', 1)[1]}",
                                  f"ADAPTER {exported.adapter_key}")
    created = await client.request(sj.OLLAMA_CREATE, {"name": f"{req.name}-copy", "modelfile": modelfile},
                                   timeout=120)
    assert created["model"] == f"{req.name}-copy" and created["adapters"]
    copy = await client.request(sj.OLLAMA_SHOW, OllamaModelRef(model=f"{req.name}-copy"))
    assert "<|im_end|>" in str(copy.get("parameters", "")) and "im_start" in copy.get("template", "")
    assert (await ServedModel.find_one(ServedModel.name == req.name)).job_id == req.job_id


async def test_merged_export_and_the_base_gguf_is_reused(client, store, dataset_id) -> None:
    req = request(dataset_id, mode="merged", outtype="q8_0")
    subject, exported, _ = await run_to_published(client, req)
    assert subject == sj.MODEL_PUBLISHED
    assert exported.mode == "merged" and exported.adapter_key is None
    assert exported.model_key == f"jobs/{req.job_id}/export/model-q8_0.gguf"
    modelfile = (await store.get_bytes(exported.modelfile_key)).decode()
    assert "ADAPTER" not in modelfile


async def test_request_reply_errors_are_answered_not_dropped(client) -> None:
    from core.errors import CodeTuneError

    with pytest.raises(CodeTuneError) as err:
        await client.request(sj.OLLAMA_SHOW, OllamaModelRef(model="no-such-model"))
    assert err.value.code != "internal" and "no-such-model" in err.value.message
    with pytest.raises(CodeTuneError, match="model"):
        await client.request(sj.OLLAMA_CHAT, {"messages": []})


async def test_pipeline_command_end_to_end_with_push(settings, client, monkeypatch, tmp_path) -> None:
    """`codetune pipeline`'s code: every stage through events, one chat, then `--push`: the pipeline publishes
    `model.push.requested` and the models stage (which alone holds the HF token) pushes to a hub stand-in."""
    from pydantic import SecretStr

    from devkit.hub_standin import serve_hub
    from devkit.tinymodel import toy_dataset
    from events.payloads import ExportOptions, Hyperparameters
    from infra.pipeline import run_pipeline
    from storage.documents import HubPush

    data = toy_dataset(tmp_path / "alpaca.jsonl", "alpaca", rows=24)
    name = f"pipe-{uuid.uuid4().hex[:6]}"
    repo = f"me/tiny-finetune-{uuid.uuid4().hex[:6]}"
    with serve_hub("hf_test_token_123") as (url, hub):
        # the in-process models stage (`workers`) reads this settings object: only it gets the token
        monkeypatch.setattr(settings, "hf_endpoint", url)
        monkeypatch.setattr(settings, "hf_token", SecretStr("hf_test_token_123"))
        pipeline_settings = settings.model_copy(update={"hf_token": None})
        async with client.subscribe([sj.MODEL_PUSH_REQUESTED]) as q:
            result = await run_pipeline(pipeline_settings, TINY_REPO, data, name, Hyperparameters(
                max_steps=24, learning_rate=3e-2, eval_steps=8, save_steps=8, max_seq_len=128), ExportOptions(),
                "What is the capital of Peru?", push=repo)
            _, command = await client.wait_for(q, lambda _, d: d.get("repo_id") == repo, 5)
    assert isinstance(result["answer"], str) and result["metrics"]["steps"] == 24
    assert result["report"]["gate"]["passed"] and result["report"]["job_id"] == result["job_id"]
    assert command.job_id == result["job_id"] and command.private is True
    files = hub.repos[repo]["files"]
    assert {"README.md", "Modelfile", "adapter-f16.gguf", "model-f16.gguf"} <= set(files)
    assert any(f.startswith("adapter/") and f.endswith("adapter_model.safetensors") for f in files)
    assert b"base_model: codetune-test/tiny-llama" in files["README.md"]
    assert b"<|im_end|>" in files["README.md"]  # the stop tokens, read from the job's Modelfile
    assert hub.repos[repo]["private"] is True
    assert all(b"hf_test_token_123" not in v for v in files.values() if isinstance(v, bytes))
    record = await HubPush.find_one(HubPush.job_id == result["job_id"], HubPush.repo_id == repo)
    assert record.status == "pushed" and "hf_test_token_123" not in record.model_dump_json()
    assert result["pushed"] == record.commit_url
