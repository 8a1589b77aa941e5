"""`codetune demo`: the whole job end to end on the embedded local stack, with no hub access.

It starts the local stack (if not running), runs every available stage in this process, and drives
them through events exactly like a user would.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from rich.console import Console

from infra.settings import Settings

console = Console()

DEMO_CHAT = [
    ("What colour is the sky?", "The sky is blue."),
    ("What colour is grass?", "Grass is green."),
    ("What colour is snow?", "Snow is white."),
    ("What colour is coal?", "Coal is black."),
]


def write_demo_dataset(path: Path, repeat: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(repeat):
            for q, a in DEMO_CHAT:
                f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                                 {"role": "assistant", "content": a}]}) + "\n")
    return path


@contextlib.asynccontextmanager
async def running_stages(settings: Settings, stages: list[str] | None = None) -> AsyncIterator[Any]:
    os.environ["CODETUNE_BUILD_APP"] = "0"
    import logging

    from handlers.app import build_app

    app = build_app(stages, settings, access_log_level=logging.DEBUG)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


async def run_demo(settings: Settings) -> dict[str, Any]:
    from infra.cli import upload_dataset

    data = write_demo_dataset(settings.scratch_dir / "demo" / "colours.jsonl")
    async with running_stages(settings, ["datasets"]):
        console.rule("[bold]1. dataset")
        _, answer = await upload_dataset(settings, data, "colours.jsonl", "auto", True, 60)  # type: ignore[misc]
    return {"dataset": answer.model_dump()}
