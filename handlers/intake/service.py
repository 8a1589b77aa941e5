"""The intake stage's work, usable without a broker: record a requested job as `queued`.

A submitter (the bridge, `codetune tune`, a raw `nats pub tuning.requested`) sees its job from the moment
JetStream accepted the request, whether or not a trainer is free: intake has its own durable on the
subject, separate from the trainers' work queue, and records the job there and then. The trainer that
later takes the request finds the job recorded and runs it as usual.

Idempotent per job: the record only ever inserts (storage.jobs.record_requested), so a redelivery, a
second request for the same job, or a request arriving after a trainer already started or finished the
job changes nothing. The job id rule is the tuning stage's: the request's `job_id`, else one derived from
the request's event id (events.ids.job_id_for), so both stages name the same job.
"""

from __future__ import annotations

import logging

from events.ids import job_id_for
from events.payloads import TuningRequested
from storage.documents import TuningJob
from storage.jobs import QUEUED, record_requested

log = logging.getLogger("codetune.intake")


def job_id_of(event: TuningRequested, event_id: str) -> str:
    return event.job_id or job_id_for(event_id)


async def record_queued(event: TuningRequested, event_id: str) -> TuningJob:
    """Record the requested job as `queued` unless it is already recorded; returns the job as stored."""
    job_id = job_id_of(event, event_id)
    job = await record_requested(job_id, event, QUEUED)
    log.debug("job %s recorded (%s)", job_id, job.status)
    return job
