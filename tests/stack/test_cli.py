"""The `codetune` command line against the real stack, run as a user runs it (a subprocess)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import TINY_REPO

pytestmark = [pytest.mark.usefixtures("workers", "tuning_worker"), pytest.mark.slow]


async def codetune(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    # in a thread: the in-process stages of the `workers` fixture share this test's event loop
    return await asyncio.to_thread(
        subprocess.run,[sys.executable, "-m", "infra.cli", *args], env={**os.environ, **env, "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=timeout,
    )


async def test_upload_pull_tune_show_and_list(env, tmp_path) -> None:
    from devkit.tinymodel import toy_dataset

    data = toy_dataset(tmp_path / "alpaca.jsonl", "alpaca", rows=32)
    up = await codetune(env, "dataset", "upload", str(data))
    assert up.returncode == 0, up.stdout + up.stderr
    assert "validated" in up.stdout and "format=alpaca rows=32" in up.stdout
    dataset_id = up.stdout.split("dataset_id=")[1].split()[0]

    pull = await codetune(env, "model", "pull", TINY_REPO)
    assert pull.returncode == 0 and "pulled" in pull.stdout, pull.stdout + pull.stderr
    assert TINY_REPO in (await codetune(env, "model", "list")).stdout

    tune = await codetune(env, "tune", "--model", TINY_REPO, "--dataset", dataset_id, "--max-steps", "12",
                    "--learning-rate", "0.01", "--eval-steps", "6", "--save-steps", "6", "--max-seq-len", "128",
                    "--no-export", "--wait")
    assert tune.returncode == 0, tune.stdout + tune.stderr
    assert "succeeded" in tune.stdout and "12/12" in tune.stdout
    assert "dataset lint: 32 rows" in tune.stdout and "estimate: ~" in tune.stdout  # printed while it ran
    job_id = tune.stdout.split("job ")[1].split()[0]
    show = await codetune(env, "job", "show", job_id, "--json")
    doc = json.loads(show.stdout)
    assert doc["status"] == "succeeded" and doc["progress"] == 1.0 and doc["metrics"]["steps"] == 12
    assert doc["dataset_lint"]["rows"] == 32 and doc["estimate"]["seconds"] > 0
    table = (await codetune(env, "job", "show", job_id)).stdout
    assert "tokens per row:" in table and "tok/s, measured over the first 3 steps" in table
    assert "actual run" in table
    assert job_id in (await codetune(env, "job", "list")).stdout


async def test_bad_hyperparameter_is_refused_before_anything_is_published(env) -> None:
    r = await codetune(env, "tune", "--model", TINY_REPO, "--dataset", "ds-x", "--learning-rate", "-1")
    assert r.returncode == 1 and "learning_rate" in r.stdout and "greater than 0" in r.stdout


async def test_cancel_of_unknown_job_is_harmless_and_bad_repo_is_refused(env) -> None:
    assert (await codetune(env, "job", "cancel", "ftjob-unknown1")).returncode == 0
    r = await codetune(env, "model", "pull", "../etc/passwd")
    assert r.returncode == 1 and "org/name" in r.stdout


async def test_model_push_is_answered_by_the_models_stage(env) -> None:
    r = await codetune(env, "model", "push", "ftjob-never-ran", "me/some-repo")
    assert r.returncode == 1 and "job_not_found" in r.stdout, r.stdout + r.stderr
    r = await codetune(env, "model", "push", "ftjob-never-ran", "no-namespace")
    assert r.returncode == 1 and "user/name" in r.stdout


async def test_save_a_finished_job_list_it_and_import_it_with_overrides(env, client, tmp_path) -> None:
    from devkit.tinymodel import toy_dataset
    from events import subjects as sj

    data = toy_dataset(tmp_path / "text.txt", "text", rows=16)
    up = await codetune(env, "dataset", "upload", str(data))
    dataset_id = up.stdout.split("dataset_id=")[1].split()[0]
    tune = await codetune(env, "tune", "--model", TINY_REPO, "--dataset", dataset_id, "--max-steps", "4",
                          "--eval-steps", "2", "--save-steps", "2", "--lora-r", "4", "--no-export", "--wait")
    job_id = tune.stdout.split("job ")[1].split()[0]
    assert (await codetune(env, "user-model", "save", "ftjob-nope", "--name", "x")).returncode == 1

    saved = await codetune(env, "user-model", "save", job_id, "--name", "Colours v1")
    assert saved.returncode == 0, saved.stdout + saved.stderr
    model_id = saved.stdout.split("saved ")[1].split()[0]
    assert f"jobs/{job_id}/adapter" in saved.stdout  # the real artifact key, not a placeholder
    assert "Colours v1" in (await codetune(env, "user-model", "list")).stdout

    async with client.subscribe([sj.TUNING_REQUESTED]) as q:
        imported = await codetune(env, "user-model", "import", model_id, "--set", "learning_rate=0.001",
                                  "--set", "max_steps=3")
        assert imported.returncode == 0, imported.stdout + imported.stderr
        new_job = imported.stdout.split("job ")[1].split()[0]
        _, event = await client.wait_for(q, lambda _, d: d.get("job_id") == new_job, 10)
    assert event.hyperparameters.learning_rate == 0.001 and event.hyperparameters.max_steps == 3
    assert event.hyperparameters.lora_r == 4 and event.dataset_id == dataset_id  # the saved parameters
    bad = await codetune(env, "user-model", "import", model_id, "--set", "lora_r=0")
    assert bad.returncode == 1 and "lora_r" in bad.stdout
