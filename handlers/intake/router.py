"""intake stage: `tuning.requested` → the job recorded as `queued` (its own durable, never the trainers').

Ack policy: MANUAL via FailurePolicy — acked once the job document exists (inserted now, or found as
recorded before); a malformed request is dead-lettered once, here (the trainers' consumer terminates it
without a second letter); MongoDB down → nak with backoff for the retry window, then dead-lettered.
"""

from faststream.nats import NatsMessage

from events.payloads import TuningRequested
from events.streams import INTAKE_REQUESTED
from handlers.common import Outputs, handler, incoming, jetstream_subscriber, pipeline_router
from handlers.intake.service import record_queued

router = pipeline_router()
# intake answers nothing: it dead-letters a malformed request (and fails its job, when the body names one)
outputs = Outputs(router, "intake", letters=[INTAKE_REQUESTED])


@router.subscriber(**jetstream_subscriber(INTAKE_REQUESTED), title="intake:tuning.requested",
                   description="records it `queued` at once")
@handler
async def on_tuning_requested(event: TuningRequested, msg: NatsMessage) -> None:
    await record_queued(event, incoming(msg).id)
