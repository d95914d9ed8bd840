"""The outbox: events wait here, per endpoint, until delivered or given up; and what each room has
announced, so an event goes out once per change even when its source runs again (a restart).

Every event is recorded together with a `Transition` of its room's announced state, atomically: the
event is enqueued only if the transition applies (stage.added only for a Stage not yet announced,
room.live only if the room was not announced live). The memory outbox serves one replica and loses
everything with its process; the Redis one (redis_outbox.py) survives restarts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from services.webhooks.events import WebhookEvent

# A room's announced state lives at most this long after its last change (a room that ended while
# no source was running would otherwise keep it forever).
ROOM_STATE_TTL_SECONDS = 30 * 86_400


class Change(Enum):
    SET = "set"
    UNSET = "unset"
    END = "end"


@dataclass(frozen=True)
class Transition:
    """SET applies if `field` does not already hold `value`; UNSET if `field` is there; END if the
    room has any announced state (it is then forgotten)."""

    change: Change
    field: str = ""
    value: str = ""

    @classmethod
    def set(cls, field: str, value: str = "1") -> Transition:
        return cls(Change.SET, field, value)

    @classmethod
    def unset(cls, field: str) -> Transition:
        return cls(Change.UNSET, field)

    @classmethod
    def end(cls) -> Transition:
        return cls(Change.END)


@dataclass(frozen=True)
class Delivery:
    """One event to deliver to one endpoint; `attempts` counts the failed ones so far."""

    event_id: str
    body: str
    created_at: float
    attempts: int


@dataclass(frozen=True)
class Backlog:
    pending: int
    oldest_created_at: float | None
    next_due_at: float | None


class Outbox(Protocol):
    async def record(self, room: str, transition: Transition, event: WebhookEvent | None = None) -> bool:
        """Applies the transition and, if it applied, enqueues the event for every endpoint."""
        ...

    async def claim(self, endpoint: str, now: float, limit: int, lease_until: float) -> list[Delivery]:
        """Deliveries due by `now`, hidden from other claims until `lease_until` (a dispatcher that
        dies holding them loses nothing: they come due again)."""
        ...

    async def renew(self, endpoint: str, event_id: str, held_until: float, until: float) -> bool:
        """Extends a claim that still holds (nobody claimed the delivery since); False if it does not."""
        ...

    async def retry(self, endpoint: str, event_id: str, at: float) -> None:
        """A failed attempt: counts it, and makes the delivery due again at `at`."""
        ...

    async def finish(self, endpoint: str, event_id: str) -> bool:
        """Delivered or given up: the delivery leaves the outbox. False if it had already left."""
        ...

    async def backlog(self, endpoint: str) -> Backlog: ...

    async def close(self) -> None: ...


@dataclass
class _Pending:
    created_at: float
    due_at: float
    attempts: int = 0


@dataclass
class _Queue:
    pending: dict[str, _Pending] = field(default_factory=dict)


class MemoryOutbox:
    """The outbox of one process: nothing survives it."""

    def __init__(self, endpoints: Sequence[str]) -> None:
        self._queues = {endpoint: _Queue() for endpoint in endpoints}
        self._bodies: dict[str, str] = {}
        self._refs: dict[str, int] = {}
        self._rooms: dict[str, dict[str, str]] = {}

    async def record(self, room: str, transition: Transition, event: WebhookEvent | None = None) -> bool:
        state = self._rooms.get(room, {})
        if transition.change is Change.SET:
            if state.get(transition.field) == transition.value:
                return False
            self._rooms.setdefault(room, state)[transition.field] = transition.value
        elif transition.change is Change.UNSET:
            if state.pop(transition.field, None) is None:
                return False
            if not state:
                del self._rooms[room]  # as Redis drops an emptied hash
        elif self._rooms.pop(room, None) is None:
            return False
        if event is not None and self._queues:
            self._bodies[event.id] = event.body()
            self._refs[event.id] = len(self._queues)
            for queue in self._queues.values():
                queue.pending[event.id] = _Pending(created_at=event.timestamp, due_at=event.timestamp)
        return True

    async def claim(self, endpoint: str, now: float, limit: int, lease_until: float) -> list[Delivery]:
        queue = self._queues[endpoint]
        due = sorted((p.due_at, event_id) for event_id, p in queue.pending.items() if p.due_at <= now)
        claimed = []
        for _, event_id in due[:limit]:
            pending = queue.pending[event_id]
            pending.due_at = lease_until
            claimed.append(Delivery(event_id, self._bodies[event_id], pending.created_at, pending.attempts))
        return claimed

    async def renew(self, endpoint: str, event_id: str, held_until: float, until: float) -> bool:
        pending = self._queues[endpoint].pending.get(event_id)
        if pending is None or pending.due_at != held_until:
            return False
        pending.due_at = until
        return True

    async def retry(self, endpoint: str, event_id: str, at: float) -> None:
        pending = self._queues[endpoint].pending.get(event_id)
        if pending is not None:
            pending.attempts += 1
            pending.due_at = at

    async def finish(self, endpoint: str, event_id: str) -> bool:
        if self._queues[endpoint].pending.pop(event_id, None) is None:
            return False
        self._refs[event_id] -= 1
        if self._refs[event_id] <= 0:
            del self._refs[event_id]
            del self._bodies[event_id]
        return True

    async def backlog(self, endpoint: str) -> Backlog:
        pending = self._queues[endpoint].pending.values()
        return Backlog(
            pending=len(pending),
            oldest_created_at=min((p.created_at for p in pending), default=None),
            next_due_at=min((p.due_at for p in pending), default=None),
        )

    async def close(self) -> None:
        return None
