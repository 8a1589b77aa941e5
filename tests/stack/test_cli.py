"""The `codetune` command line against the real stack, run as a user runs it (a subprocess)."""

from __future__ import annotations

import asyncio
import json
import os
import re
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
    # the numbers say what they are: the bar's last-step loss and eval loss, the summary's mean of the last 10
    assert "eval_loss " in tune.stdout and "(first step) → loss(avg10) " in tune.stdout
    job_id = tune.stdout.split("job ")[1].split()[0]
    show = await codetune(env, "job", "show", job_id, "--json")
    doc = json.loads(show.stdout)
    assert doc["status"] == "succeeded" and doc["progress"] == 1.0 and doc["metrics"]["steps"] == 12
    assert doc["dataset_lint"]["rows"] == 32 and doc["estimate"]["seconds"] > 0
    table = (await codetune(env, "job", "show", job_id)).stdout
    assert "tokens per row:" in table and "tok/s, measured over the first 3 steps" in table
    assert "actual run" in table
    avg10 = f"{doc['metrics']['train_loss']:.3f}"
    assert re.search(rf"│ loss\(avg10\) +│ {avg10} ", table) and re.search(r"│ eval_loss +│ \d", table), table
    listed = (await codetune(env, "job", "list")).stdout
    assert job_id in listed and "loss(avg10)" in listed and "eval_loss" in listed
    row = next(line for line in listed.splitlines() if job_id in line)
    assert avg10 in row and f"{doc['eval_loss']:.3f}" in row


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


async def test_a_config_file_and_an_override_reach_the_tuning_request(env, client, tmp_path) -> None:
    from events import subjects as sj

    cfg = tmp_path / "hp.yaml"
    cfg.write_text("learning_rate: 0.003\nlora_r: 4\nwarmup_ratio: 0.2\nlr_scheduler: linear\n"
                   "target_modules: [q_proj, v_proj]\ngradient_accumulation_steps: 2\n")
    async with client.subscribe([sj.TUNING_REQUESTED]) as q:
        r = await codetune(env, "tune", "--model", TINY_REPO, "--dataset", "ds-cfgnone1", "--config", str(cfg),
                           "--lora-r", "2", "--eval-steps", "7", "--no-export")
        assert r.returncode == 0, r.stdout + r.stderr
        job_id = r.stdout.split("job ")[1].split()[0]
        _, event = await client.wait_for(q, lambda _, d: d.get("job_id") == job_id, 10)
    hp = event.hyperparameters
    assert (hp.learning_rate, hp.warmup_ratio, hp.lr_scheduler, hp.gradient_accumulation_steps) == (
        0.003, 0.2, "linear", 2)  # from the file
    assert hp.target_modules == ["q_proj", "v_proj"]
    assert hp.lora_r == 2 and hp.eval_steps == 7  # the command line overrides the file

    cfg.write_text("lora_dropout: 1.5\n")
    bad = await codetune(env, "tune", "--model", TINY_REPO, "--dataset", "ds-cfgnone1", "--config", str(cfg))
    assert bad.returncode == 1 and bad.stdout.strip().splitlines() == [
        "error: lora_dropout (in hp.yaml): Input should be less than 1 (got 1.5)"], bad.stdout + bad.stderr


async def test_pipeline_stops_at_a_dataset_that_fails_validation(env, tmp_path) -> None:
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\nnot json\n')
    r = await codetune(env, "pipeline", TINY_REPO, "--dataset", str(bad), "--name", "never-made", "--max-steps", "2")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "line 2: invalid JSON" in r.stdout
    assert "error: dataset broken.jsonl failed validation: invalid_dataset:" in r.stdout
    assert "more: codetune dataset list --json" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr and "2/5 base model" not in r.stdout  # stopped there


async def test_tune_wait_reports_a_missing_base_model_and_where_to_look(env, tmp_path) -> None:
    from devkit.tinymodel import toy_dataset

    up = await codetune(env, "dataset", "upload", str(toy_dataset(tmp_path / "t.txt", "text", rows=8)))
    dataset_id = up.stdout.split("dataset_id=")[1].split()[0]
    r = await codetune(env, "tune", "--model", "codetune-test/no-such-model", "--dataset", dataset_id,
                       "--max-steps", "2", "--no-export", "--wait")
    assert r.returncode == 2, r.stdout + r.stderr
    job_id = r.stdout.split("job ")[1].split()[0]
    assert f"error: job {job_id} failed: " in r.stdout and "no-such-model" in r.stdout
    assert f"more: codetune job show {job_id}" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr
    show = await codetune(env, "job", "show", job_id, "--json")
    assert json.loads(show.stdout)["status"] == "failed"


async def test_a_dead_lettered_job_names_its_letter(settings, client, uid) -> None:
    """A request that fails its schema is dead-lettered; the job's `tuning.failed` carries the letter's
    sequence, so `tune --wait` / `pipeline` print `codetune dlq show SEQ` (and that letter is the request)."""
    from events import subjects as sj
    from events.streams import DEAD_LETTERS
    from infra.flows import FlowError, follow_job

    job_id = f"ftjob-dl{uid}"
    body = json.dumps({"job_id": job_id, "base_model": TINY_REPO, "dataset_id": "ds-none12",
                       "hyperparameters": {"lora_r": 0}}).encode()
    async with client.subscribe([sj.progress_subject(job_id), sj.TUNING_COMPLETED, sj.TUNING_FAILED,
                                 sj.TUNING_CANCELLED]) as q:
        await client.publish_raw(sj.TUNING_REQUESTED, body)  # what `nats pub` sends: no CLI check on the way
        with pytest.raises(FlowError) as e:
            await follow_job(client, q, job_id, 30)
    assert e.value.code == 2 and "invalid_payload" in e.value.message and "lora_r" in e.value.message
    assert e.value.hints[0] == f"codetune job show {job_id}" and e.value.hints[1].startswith("codetune dlq show ")
    letter = json.loads((await client.js.get_msg(DEAD_LETTERS.name, int(e.value.hints[1].split()[-1]))).data)
    assert letter["subject"] == sj.TUNING_REQUESTED and job_id in letter["body"]


NOISE = ("Loading weights", "Writing model shards", "FutureWarning", "is being executed", "Traceback")

# a short flow with every source of noise: in-process stages started and stopped (FastStream's subscriber
# tasks), a model loaded and saved by transformers (progress bars), a library warning, then an error
NOISY_COMMAND = """
import sys, warnings
from infra import cli

@cli.app.command("noisy")
def noisy(model_dir: str, out: str) -> None:
    from infra.demo import running_stages
    from core.settings import get_settings

    async def stages() -> None:
        async with running_stages(get_settings(), ["datasets"]):
            pass

    cli.run(stages())
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(model_dir).save_pretrained(out)
    warnings.warn("a library's FutureWarning", FutureWarning)
    raise RuntimeError("the flow broke\\nsecond line of detail")

sys.argv[0] = "codetune"
cli.main()
"""


async def test_the_console_is_quiet_unless_verbose(env, hub_cache, tmp_path) -> None:
    snapshot = next((hub_cache / ("models--" + TINY_REPO.replace("/", "--")) / "snapshots").iterdir())

    def run(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", NOISY_COMMAND, *flags, "noisy", str(snapshot),
                               str(tmp_path / f"out{len(flags)}")], env={**os.environ, **env, "COLUMNS": "200"},
                              capture_output=True, text=True, timeout=240)

    quiet, loud = await asyncio.gather(asyncio.to_thread(run), asyncio.to_thread(run, "-v"))
    out = quiet.stdout + quiet.stderr
    assert quiet.returncode == 1 and not [n for n in NOISE if n in out], out
    assert out.strip().splitlines() == [
        "error: RuntimeError: the flow broke  (`codetune -v …` shows the traceback)"], out
    loud_out = loud.stdout + loud.stderr
    assert loud.returncode == 1 and all(n in loud_out for n in NOISE), loud_out
