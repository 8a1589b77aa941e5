"""Job ids: the one rule for minting and checking them (no broker, no database).

Every party that names a new job (the CLI, the pipeline demo, the bridge, a saved-model import, and the
intake and tuning stages for a request that named none) mints it here, with one prefix (`ftjob-`, as
OpenAI's fine-tuning jobs). Ids of other shapes that users chose or older versions minted (`job-…`) stay
valid wherever the contract's pattern accepts them: checking is by `ID_PATTERN`, never by prefix.
"""

from __future__ import annotations

import re
import uuid

# 3-64 of [A-Za-z0-9_-], starting with a letter or digit: every id of the contract (jobs, datasets, models)
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{2,63}$"
_ID_RE = re.compile(ID_PATTERN)
JOB_PREFIX = "ftjob-"


def new_job_id() -> str:
    """A fresh job id for a new request."""
    return JOB_PREFIX + uuid.uuid4().hex[:20]


def job_id_for(event_id: str) -> str:
    """The job id of a request that named none: stable across redeliveries of that request (and the same
    for intake and the tuning stage, which both derive it from the request's event id)."""
    return JOB_PREFIX + uuid.uuid5(uuid.NAMESPACE_URL, f"codetune:job:{event_id}").hex[:20]


def is_id(value: object) -> bool:
    """Whether `value` is a valid id of the contract (a job id minted here, or any other accepted shape)."""
    return isinstance(value, str) and _ID_RE.match(value) is not None
