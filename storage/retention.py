"""Retention: what CodeTune removes once nothing needs it any more (README "Retention and disk").

The policy, from settings:

- a job's local files (the tuning/export scratch under `<work>/jobs/<job>`, the serving stage's GGUF copies
  under `<work>/gguf/jobs/<job>`) go as soon as the stage's effect is stored (`retention_local_scratch`);
- a succeeded job's checkpoints in the bucket go once its final adapter is stored (the adapter, the export,
  the report and the plot stay) (`retention_prune_checkpoints`);
- a failed or cancelled job keeps its newest checkpoint (to resume or inspect) for `retention_failed_days`,
  older ones go at once;
- caches of immutable inputs shared by jobs (base models mirrored from the bucket, base GGUFs) stay: the
  next job reuses them; `codetune gc --caches` removes them too.

The stages apply their part when their effect is stored (`after_training`, `after_publish`); `codetune gc`
applies the whole policy by hand (`--dry-run` lists it), also after a crash left files behind.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from core.settings import Settings
from storage import keys
from storage.documents import TuningJob
from storage.jobs import SUCCEEDED, TERMINAL
from storage.objects import ObjectStore, local_path

log = logging.getLogger("codetune.retention")

# after training: the stages that may still read the job's files (export reads the adapter, serving the GGUFs)
IN_FLIGHT_STAGES = {"exporting", "publishing"}


@dataclass(frozen=True)
class Removal:
    where: Literal["bucket", "disk"]
    path: str  # a key prefix (bucket) or a folder (disk)
    bytes: int
    reason: str


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _disk(path: Path, reason: str) -> list[Removal]:
    return [Removal("disk", str(path), _dir_bytes(path), reason)] if path.exists() else []


def gguf_cache(settings: Settings) -> Path:
    """Where the stages keep local copies of GGUF objects (`ObjectStore.fetch` under this folder)."""
    return settings.scratch_dir / "gguf"


def job_dirs(settings: Settings, job_id: str) -> list[Path]:
    """Every local folder that holds one job's files."""
    prefix = keys.job_prefix(job_id)
    return [local_path(settings.scratch_dir, prefix), local_path(gguf_cache(settings), prefix)]


async def _checkpoints(store: ObjectStore, job_id: str) -> dict[str, int]:
    """Checkpoint prefix (`jobs/<id>/checkpoints/step-N`) → bytes, oldest first."""
    out: dict[str, int] = {}
    for key, size in await store.list(keys.join("jobs", job_id, "checkpoints") + "/"):
        prefix = "/".join(key.split("/")[:4])
        out[prefix] = out.get(prefix, 0) + size
    return dict(sorted(out.items()))


async def job_removals(job: TuningJob, store: ObjectStore, settings: Settings, now: datetime) -> list[Removal]:
    """What the policy removes for one job now; nothing for a job that is still running or being exported
    or published."""
    if job.status not in TERMINAL or job.stage in IN_FLIGHT_STAGES:
        return []
    out: list[Removal] = []
    if settings.retention_local_scratch:
        for path in job_dirs(settings, job.job_id):
            out += _disk(path, f"local files of {job.status} job {job.job_id}")
    ckpts = await _checkpoints(store, job.job_id)
    if job.status == SUCCEEDED:
        if settings.retention_prune_checkpoints and job.adapter_key:
            out += [Removal("bucket", p, n, f"checkpoint of succeeded job {job.job_id} (final adapter kept)")
                    for p, n in ckpts.items()]
        return out
    *older, newest = list(ckpts.items()) or [("", 0)]
    out += [Removal("bucket", p, n, f"older checkpoint of {job.status} job {job.job_id}") for p, n in older]
    updated = job.updated_at if job.updated_at.tzinfo else job.updated_at.replace(tzinfo=UTC)
    if newest[0] and now - updated >= timedelta(days=settings.retention_failed_days):
        out.append(Removal("bucket", newest[0], newest[1], f"last checkpoint of {job.status} job {job.job_id}, "
                           f"kept {settings.retention_failed_days:g} days"))
    return out


def cache_removals(settings: Settings) -> list[Removal]:
    """Caches shared by jobs (reused by the next one): only `codetune gc --caches` removes them."""
    out = _disk(settings.scratch_dir / "models", "cached base models (mirrored from the bucket)")
    out += _disk(gguf_cache(settings) / "gguf", "cached base-model GGUFs")
    return out


async def plan(store: ObjectStore, settings: Settings, *, caches: bool = False, now: datetime | None = None
               ) -> list[Removal]:
    now = now or datetime.now(UTC)
    out: list[Removal] = []
    async for job in TuningJob.find({"status": {"$in": sorted(TERMINAL)}}):
        out += await job_removals(job, store, settings, now)
    return out + (cache_removals(settings) if caches else [])


async def apply(store: ObjectStore, removals: list[Removal]) -> int:
    """Remove what `plan` listed; returns the bytes freed."""
    freed = 0
    for r in removals:
        if r.where == "bucket":
            await store.remove_prefix(r.path + "/")
        else:
            await asyncio.to_thread(shutil.rmtree, r.path, True)
        freed += r.bytes
    return freed


async def after_training(store: ObjectStore, settings: Settings, job: TuningJob) -> None:
    """The tuning stage stored a job's final adapter: its checkpoints are not needed any more."""
    if job.status != SUCCEEDED or not settings.retention_prune_checkpoints or not job.adapter_key:
        return
    for prefix in await _checkpoints(store, job.job_id):
        await store.remove_prefix(prefix + "/")


async def after_publish(settings: Settings, job_id: str) -> None:
    """The serving stage stored its answer (published or failed): the job's local files on this host go."""
    if settings.retention_local_scratch:
        for path in job_dirs(settings, job_id):
            await asyncio.to_thread(shutil.rmtree, path, True)
