"""`IVS Stage Update` events (ivs-facts §4): parsed, de-duplicated by id, ordered per participant."""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime

DETAIL_TYPE = "IVS Stage Update"
PUBLISHED = "Participant Published"
UNPUBLISHED = "Participant Unpublished"

# Label values of fanout_monitor_events_total{event}.
EVENT_LABELS = {PUBLISHED: "participant_published", UNPUBLISHED: "participant_unpublished"}
OTHER_EVENT = "other"
UNKNOWN_EVENT = "unknown"


class MalformedEvent(ValueError):
    """The message is not an EventBridge event we can read; retrying it cannot help."""


@dataclass(frozen=True)
class StageEvent:
    id: str
    detail_type: str
    stage_arn: str
    event_name: str
    event_time: datetime
    participant_id: str
    session_id: str

    @property
    def label(self) -> str:
        return EVENT_LABELS.get(self.event_name, OTHER_EVENT)

    @property
    def about_publishing(self) -> bool:
        return self.detail_type == DETAIL_TYPE and self.event_name in (PUBLISHED, UNPUBLISHED)


def parse_event(body: str) -> StageEvent:
    """Reads an EventBridge event (the whole SQS message body); raises MalformedEvent."""
    try:
        event = json.loads(body)
    except ValueError:
        raise MalformedEvent("not JSON") from None
    if not isinstance(event, dict):
        raise MalformedEvent("not a JSON object")
    event_id = event.get("id")
    detail_type = event.get("detail-type")
    detail = event.get("detail")
    resources = event.get("resources")
    if not isinstance(event_id, str) or not event_id:
        raise MalformedEvent("no id")
    if not isinstance(detail_type, str):
        raise MalformedEvent("no detail-type")
    if not isinstance(detail, dict):
        raise MalformedEvent("no detail")
    if detail_type != DETAIL_TYPE:
        # Another kind of IVS event on the same queue: readable, just not ours to act on.
        return StageEvent(event_id, detail_type, "", "", datetime.min.replace(tzinfo=UTC), "", "")
    if not isinstance(resources, list) or not resources or not isinstance(resources[0], str):
        raise MalformedEvent("no stage ARN in resources")
    event_name = detail.get("event_name")
    if not isinstance(event_name, str):
        raise MalformedEvent("no detail.event_name")
    participant_id = detail.get("participant_id") or ""
    if not isinstance(participant_id, str):
        raise MalformedEvent("detail.participant_id is not a string")
    if event_name in (PUBLISHED, UNPUBLISHED) and not participant_id:
        raise MalformedEvent("no detail.participant_id")
    session_id = detail.get("session_id") or ""
    return StageEvent(
        id=event_id,
        detail_type=detail_type,
        stage_arn=resources[0],
        event_name=event_name,
        event_time=_parse_time(detail.get("event_time")),
        participant_id=participant_id,
        session_id=session_id if isinstance(session_id, str) else "",
    )


def _parse_time(value: object) -> datetime:
    if not isinstance(value, str):
        raise MalformedEvent("no detail.event_time")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise MalformedEvent("detail.event_time is not ISO 8601") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class EventGate:
    """Lets each event through once, and only if it is not older than what we know of its participant.

    Delivery is best effort: duplicates, hours-late and out-of-order events happen. An Unpublished
    older than the latest Published (or vice versa) says nothing new and is `stale`. Memory is bounded:
    the oldest ids and participants are forgotten first; a forgotten duplicate only costs a refresh.
    """

    def __init__(self, max_ids: int = 10_000, max_participants: int = 10_000) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._latest: OrderedDict[tuple[str, str], datetime] = OrderedDict()
        self._max_ids = max_ids
        self._max_participants = max_participants

    def admit(self, event: StageEvent) -> str:
        """`handled` (act on it), `duplicate` or `stale`."""
        if event.id in self._ids:
            self._ids.move_to_end(event.id)
            return "duplicate"
        self._ids[event.id] = None
        if len(self._ids) > self._max_ids:
            self._ids.popitem(last=False)
        key = (event.stage_arn, event.participant_id)
        latest = self._latest.get(key)
        if latest is not None and event.event_time < latest:
            return "stale"
        self._latest[key] = event.event_time
        self._latest.move_to_end(key)
        if len(self._latest) > self._max_participants:
            self._latest.popitem(last=False)
        return "handled"
