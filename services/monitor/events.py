"""`IVS Stage Update` events (ivs-facts §4): parsed, de-duplicated by id, ordered per participant."""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeGuard

from services.common.ids import MAX_STAGE_ARN_LENGTH, STAGE_ARN_PATTERN

DETAIL_TYPE = "IVS Stage Update"
PUBLISHED = "Participant Published"
UNPUBLISHED = "Participant Unpublished"
REPLICATION_STARTED = "Participant Replication Started"
REPLICATION_STOPPED = "Participant Replication Stopped"
REPLICATION_EVENTS = (REPLICATION_STARTED, REPLICATION_STOPPED)
PUBLISHING_EVENTS = (PUBLISHED, UNPUBLISHED)
# The events that change who publishes on a Stage: each one asks for a publisher check.
PUBLISHER_CHANGES = (*PUBLISHING_EVENTS, *REPLICATION_EVENTS)
# Where a replication event may name its other Stage. The field names are unverified (ivs-facts §4):
# a value that is not a Stage ARN is ignored rather than trusted.
REPLICATION_STAGE_FIELDS = ("destination_stage_arn", "source_stage_arn")

# Label values of fanout_monitor_events_total{event}.
EVENT_LABELS = {
    PUBLISHED: "participant_published",
    UNPUBLISHED: "participant_unpublished",
    REPLICATION_STARTED: "participant_replication_started",
    REPLICATION_STOPPED: "participant_replication_stopped",
}
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
    # Every Stage the event names, resources[0] first; a replication event may name its other end too.
    stage_arns: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return EVENT_LABELS.get(self.event_name, OTHER_EVENT)

    @property
    def about_publishing(self) -> bool:
        """It changes who publishes on the Stages it names: (un)publishing, or a replica coming or going."""
        return self.detail_type == DETAIL_TYPE and self.event_name in PUBLISHER_CHANGES

    @property
    def order_key(self) -> tuple[str, ...] | None:
        """The events this one is ordered against; None if it cannot be ordered (then only de-duplicated).

        Published/Unpublished follow one participant on one Stage. Replication Started/Stopped follow one
        replication, whichever end resources[0] names, and are never compared with Published/Unpublished:
        a replication that started before the participant last published is still news for its
        destination. A replication event without its participant or its other Stage could be about any of
        the participant's (up to five) replications, so it is not ordered at all.
        """
        if self.event_name in PUBLISHING_EVENTS:
            return ("publishing", self.stage_arn, self.participant_id)
        if self.event_name in REPLICATION_EVENTS and self.participant_id and len(self.stage_arns) > 1:
            return ("replication", self.participant_id, *sorted(self.stage_arns))
        return None


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
    if event_name in PUBLISHING_EVENTS and not participant_id:
        raise MalformedEvent("no detail.participant_id")
    session_id = detail.get("session_id") or ""
    stage_arns = [resources[0]]
    if event_name in REPLICATION_EVENTS:
        stage_arns += [
            value
            for value in (detail.get(name) for name in REPLICATION_STAGE_FIELDS)
            if _is_stage_arn(value) and value not in stage_arns
        ]
    return StageEvent(
        id=event_id,
        detail_type=detail_type,
        stage_arn=resources[0],
        event_name=event_name,
        event_time=_parse_time(detail.get("event_time")),
        participant_id=participant_id,
        session_id=session_id if isinstance(session_id, str) else "",
        stage_arns=tuple(stage_arns),
    )


def _is_stage_arn(value: object) -> TypeGuard[str]:
    return (
        isinstance(value, str)
        and len(value) <= MAX_STAGE_ARN_LENGTH
        and STAGE_ARN_PATTERN.fullmatch(value) is not None
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
    older than the latest Published (or vice versa) says nothing new and is `stale`: the check the newer
    one asked for already read IVS after both. Replication Started/Stopped are ordered the same way
    within one replication (StageEvent.order_key). Memory is bounded: the oldest ids and participants
    are forgotten first; a forgotten duplicate only costs a refresh.
    """

    def __init__(self, max_ids: int = 10_000, max_participants: int = 10_000) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._latest: OrderedDict[tuple[str, ...], datetime] = OrderedDict()
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
        key = event.order_key
        if key is None:
            return "handled"
        latest = self._latest.get(key)
        if latest is not None and event.event_time < latest:
            return "stale"
        self._latest[key] = event.event_time
        self._latest.move_to_end(key)
        if len(self._latest) > self._max_participants:
            self._latest.popitem(last=False)
        return "handled"
