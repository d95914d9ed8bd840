"""The events the host app receives, and their JSON payload: {"type", "timestamp", "data": {...}}."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from services.common.capacity import Ceiling
from services.stagemanager.model import StageRecord


class EventType(StrEnum):
    ROOM_LIVE = "room.live"
    ROOM_STANDBY = "room.standby"
    ROOM_ENDED = "room.ended"
    STAGE_ADDED = "stage.added"
    STAGE_REMOVED = "stage.removed"
    CAPACITY_WARNING = "capacity.warning"
    CAPACITY_EXHAUSTED = "capacity.exhausted"
    ROOM_VIEWERS = "room.viewers"


@dataclass(frozen=True)
class WebhookEvent:
    """One event; `id` is its webhook-id, the same for every attempt to deliver it."""

    id: str
    type: EventType
    timestamp: float
    data: Mapping[str, Any]

    def body(self) -> str:
        """The exact text that is signed and sent."""
        moment = datetime.fromtimestamp(self.timestamp, tz=UTC)
        payload = {
            "type": self.type.value,
            "timestamp": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "data": dict(self.data),
        }
        return json.dumps(payload, separators=(",", ":"))


def new_event(event_type: EventType, data: Mapping[str, Any], now: float) -> WebhookEvent:
    # Ids sort as they were made (the outbox delivers ties in id order), and are unique by their
    # random half.
    return WebhookEvent(
        id=f"msg_{time.time_ns():016x}{uuid.uuid4().hex[:16]}", type=event_type, timestamp=now, data=data
    )


def room_event(event_type: EventType, room: str, now: float) -> WebhookEvent:
    """room.live, room.standby or room.ended: {"room"}."""
    return new_event(event_type, {"room": room}, now)


def stage_event(event_type: EventType, stage: StageRecord, now: float) -> WebhookEvent:
    """stage.added or stage.removed: {"room", "stageArn", "role"}."""
    return new_event(event_type, {"room": stage.room, "stageArn": stage.arn, "role": stage.role}, now)


def capacity_event(event_type: EventType, viewers: int, ceiling: Ceiling, now: float) -> WebhookEvent:
    """capacity.warning or capacity.exhausted: {"room", "viewers", "ceiling", "bindingLimit"}."""
    data = {
        "room": ceiling.room,
        "viewers": viewers,
        "ceiling": ceiling.viewers,
        "bindingLimit": ceiling.binding.value,
    }
    return new_event(event_type, data, now)


def viewers_event(viewers: int, ceiling: Ceiling, live: bool, now: float) -> WebhookEvent:
    """room.viewers: {"room", "viewers", "ceiling", "live"}."""
    data = {"room": ceiling.room, "viewers": viewers, "ceiling": ceiling.viewers, "live": live}
    return new_event(EventType.ROOM_VIEWERS, data, now)
