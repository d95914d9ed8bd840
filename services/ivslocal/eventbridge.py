"""The `IVS Stage Update` events IVS would send to EventBridge, delivered to SQS as a rule's target would."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from services.ivslocal.model import IvsState, ParticipantChange

log = logging.getLogger(__name__)

DETAIL_TYPE = "IVS Stage Update"
EVENT_SOURCE = "aws.ivs"
# ParticipantChange kinds IVS announces on EventBridge (ivs-facts §4): joins and leaves it does not.
EVENT_NAMES = {
    "published": "Participant Published",
    "unpublished": "Participant Unpublished",
    "replication-started": "Participant Replication Started",
    "replication-stopped": "Participant Replication Stopped",
}
MAX_PENDING_EVENTS = 1000
MAX_BATCH = 10  # SQS's maximum per SendMessageBatch
FIRST_RETRY_SECONDS = 0.5
MAX_RETRY_SECONDS = 5.0
# Time to deliver what is pending when the emulator stops, unless SQS is already known to be down.
CLOSE_GRACE_SECONDS = 1.0


def make_sqs_client(region: str, endpoint_url: str | None) -> Any:
    """A boto3 SQS client that fails fast: SqsEventSender retries on its own, off the event loop."""
    config = Config(retries={"total_max_attempts": 1}, connect_timeout=2, read_timeout=5)
    kwargs: dict[str, Any] = {"region_name": region, "config": config}
    if endpoint_url:
        # A local SQS (moto) takes any signature; real SQS uses the normal credential chain.
        kwargs["endpoint_url"] = endpoint_url
        kwargs["aws_access_key_id"] = "local"
        kwargs["aws_secret_access_key"] = "local"  # noqa: S105 - not a secret: a local queue's dummy
    return boto3.session.Session().client("sqs", **kwargs)


def stage_update_event(change: ParticipantChange, *, region: str, account_id: str) -> dict[str, Any] | None:
    """The event IVS would send for `change`, or None if it sends none."""
    event_name = EVENT_NAMES.get(change.kind)
    if event_name is None:
        return None
    participant = change.participant
    replication = change.replication
    extra: dict[str, str] = {}
    if change.kind in ("replication-started", "replication-stopped"):
        if replication is None:
            return None
        stage_arn, session_id = replication.source_stage_arn, replication.source_session_id
        # Our assumption, unverified against AWS (ivs-facts §4 shows no replication event): resources[0]
        # is the source Stage and the detail names both ends with these fields, ListParticipantEvents'
        # and ParticipantReplica's names in snake_case. services.monitor.events reads
        # destination_stage_arn and source_stage_arn.
        extra = {
            "source_stage_arn": replication.source_stage_arn,
            "source_session_id": replication.source_session_id,
            "destination_stage_arn": replication.destination_stage_arn,
            "destination_session_id": replication.destination_session_id,
        }
    elif participant.is_replica:
        # Also an assumption: a replica's publishing is told by its replication's Started/Stopped, not
        # as Published/Unpublished in the destination Stage. A consumer that needs the destination
        # must then read it from the replication event, which is the stricter test of that consumer.
        return None
    else:
        stage_arn, session_id = participant.stage_arn, participant.session_id
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": DETAIL_TYPE,
        "source": EVENT_SOURCE,
        "account": account_id,
        # EventBridge stamps the envelope to the second; the detail carries IVS's own, finer time.
        "time": _iso8601(datetime.now(UTC), "seconds"),
        "region": region,
        "resources": [stage_arn],
        "detail": {
            "session_id": session_id,
            "event_name": event_name,
            "event_time": _iso8601(change.time, "milliseconds"),
            "participant_id": participant.participant_id,
            "user_id": participant.user_id or "",
            **extra,
        },
    }


def _iso8601(moment: datetime, timespec: str) -> str:
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec=timespec) + "Z"


class SqsEventSender:
    """Sends message bodies to one SQS queue from a background task; `offer` never blocks or raises.

    Bodies wait in a bounded queue and go out in order, in batches, through one worker thread. While
    SQS cannot be reached the oldest batch is retried with backoff and, once the queue is full, the
    oldest waiting body is dropped: delivery is best effort, as IVS's is, and a consumer reconciles by
    polling anyway. An outage is logged when it starts and when it ends, not per event.
    """

    def __init__(self, client: Any, queue_url: str, *, max_pending: int = MAX_PENDING_EVENTS) -> None:
        self._client = client
        self._queue_url = queue_url
        self._pending: asyncio.Queue[str] = asyncio.Queue(max_pending)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ivslocal-events")
        self._task: asyncio.Task[None] | None = None
        self._down = False
        self._overflowing = False
        self._dropped = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ivslocal-eventbridge")

    def offer(self, body: str) -> None:
        if self._pending.full():
            self._pending.get_nowait()
            self._pending.task_done()
            self._dropped += 1
            if not self._overflowing and not self._down:
                log.warning(
                    "more than %d IVS events wait for SQS; dropping the oldest", self._pending.maxsize
                )
            self._overflowing = True
        self._pending.put_nowait(body)

    async def close(self, grace: float = CLOSE_GRACE_SECONDS) -> None:
        """Stops sending, after up to `grace` seconds to deliver what is pending if SQS is up."""
        if self._task is not None:
            if not self._down:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._pending.join(), grace)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # A call in flight to an unreachable SQS ends at the client's timeouts, in its own thread.
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._pending.get()]
            while len(batch) < MAX_BATCH and not self._pending.empty():
                batch.append(self._pending.get_nowait())
            delay = FIRST_RETRY_SECONDS
            while True:
                try:
                    refused = await loop.run_in_executor(self._pool, self._send, batch)
                except (BotoCoreError, ClientError) as error:
                    if not self._down:
                        self._down = True
                        log.warning(
                            "cannot send IVS events to SQS (%s); retrying, keeping at most %d",
                            error,
                            self._pending.maxsize,
                        )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, MAX_RETRY_SECONDS)
                    continue
                except Exception:
                    log.exception("sending %d IVS event(s) to SQS failed; dropping them", len(batch))
                    refused = len(batch)
                break
            self._dropped += refused
            if self._down:
                self._down = False
                log.info("sending IVS events to SQS again (%d dropped so far)", self._dropped)
            for _ in batch:
                self._pending.task_done()
            if self._pending.empty():
                self._overflowing = False

    def _send(self, bodies: list[str]) -> int:
        """Sends one batch (in the worker thread); returns how many bodies SQS refused."""
        response = self._client.send_message_batch(
            QueueUrl=self._queue_url,
            Entries=[{"Id": str(i), "MessageBody": body} for i, body in enumerate(bodies)],
        )
        failed = response.get("Failed", [])
        for entry in failed:
            log.warning("SQS refused an IVS event: %s %s", entry.get("Code"), entry.get("Message"))
        return len(failed)


def forward_stage_updates(state: IvsState, sender: SqsEventSender) -> Callable[[], None]:
    """Offers the event of every change IVS would announce; returns a function that stops it."""
    region, account_id = state.settings.region, state.settings.account_id

    def on_change(change: ParticipantChange) -> None:
        event = stage_update_event(change, region=region, account_id=account_id)
        if event is not None:
            sender.offer(json.dumps(event))

    return state.add_listener(on_change)
