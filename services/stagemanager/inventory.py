"""The stage manager's inventory and its ordered change feed (the source of WatchRoom)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Any

from services.common.errors import Unavailable
from services.stagemanager.model import RoomRecord, StageRecord

log = logging.getLogger(__name__)


class ChangeKind(Enum):
    STAGE_ADDED = "stage_added"
    STAGE_CHANGED = "stage_changed"
    STAGE_REMOVED = "stage_removed"
    ROOM_CHANGED = "room_changed"
    ROOM_ENDED = "room_ended"


@dataclass(frozen=True)
class Change:
    revision: int
    kind: ChangeKind
    room: str
    stage: StageRecord | None = None
    room_record: RoomRecord | None = None


# Put on a watcher's queue to wake it when its copy of the inventory was replaced.
_LOST = Change(0, ChangeKind.ROOM_CHANGED, "")


class Subscription:
    """One watcher: the snapshot it started from, then every later change in order."""

    def __init__(self, room_filter: str, snapshot: list[RoomRecord], revision: int, limit: int) -> None:
        self.room_filter = room_filter
        self.snapshot = snapshot
        self.revision = revision
        self._queue: asyncio.Queue[Change] = asyncio.Queue(maxsize=limit)
        self._lost = False

    def offer(self, change: Change) -> None:
        if self._lost or (self.room_filter and change.room != self.room_filter):
            return
        try:
            self._queue.put_nowait(change)
        except asyncio.QueueFull:
            # A watcher too slow to keep up must resync from a fresh snapshot, not miss changes silently.
            self._lost = True

    def lose(self) -> None:
        self._lost = True
        # Wakes a watcher waiting for its next change, so it learns at once.
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(_LOST)

    async def next(self) -> Change:
        if self._lost:
            raise Unavailable("watcher fell behind; reconnect for a fresh snapshot", code="watch_lagged")
        change = await self._queue.get()
        if change is _LOST:
            raise Unavailable("watcher fell behind; reconnect for a fresh snapshot", code="watch_lagged")
        return change


class Inventory:
    """Rooms and Stages in memory; every mutation gets a revision and goes to every watcher."""

    def __init__(self, watcher_queue_limit: int = 10_000) -> None:
        self._rooms: dict[str, RoomRecord] = {}
        # Starts from the wall clock so revisions keep increasing across a restart (see RoomEvent).
        self._revision = time.time_ns() // 1_000
        self._subscriptions: set[Subscription] = set()
        self._queue_limit = watcher_queue_limit
        # Called with every change, in order (the leader mirrors them into Redis).
        self._listeners: list[Callable[[Change], None]] = []
        # Replaced on every change: waiters hold the old one, which is set (a broadcast with no task).
        self._changed = asyncio.Event()

    def add_listener(self, listener: Callable[[Change], None]) -> None:
        self._listeners.append(listener)

    @property
    def revision(self) -> int:
        return self._revision

    def room(self, room: str) -> RoomRecord | None:
        return self._rooms.get(room)

    def rooms(self) -> list[RoomRecord]:
        return list(self._rooms.values())

    def add_room(self, record: RoomRecord) -> None:
        self._rooms[record.room] = record
        self._emit(ChangeKind.ROOM_CHANGED, record.room, room_record=record.copy(with_stages=False))

    def add_stage(self, stage: StageRecord) -> None:
        self._rooms[stage.room].stages[stage.index] = stage
        self._emit(ChangeKind.STAGE_ADDED, stage.room, stage=stage.copy())

    def update_stage(self, stage: StageRecord, **changes: Any) -> StageRecord:
        for name, value in changes.items():
            setattr(stage, name, value)
        self._emit(ChangeKind.STAGE_CHANGED, stage.room, stage=stage.copy())
        return stage

    def remove_stage(self, stage: StageRecord) -> None:
        room = self._rooms.get(stage.room)
        if room is None or room.stages.get(stage.index) is not stage:
            return
        del room.stages[stage.index]
        self._emit(ChangeKind.STAGE_REMOVED, stage.room, stage=stage.copy())

    def set_room_error(self, room: str, message: str) -> None:
        record = self._rooms[room]
        if record.last_error != message:
            record.last_error = message
            self._emit(ChangeKind.ROOM_CHANGED, room, room_record=record.copy(with_stages=False))

    def set_room_ending(self, room: str) -> None:
        record = self._rooms[room]
        record.ending = True
        self._emit(ChangeKind.ROOM_CHANGED, room, room_record=record.copy(with_stages=False))

    def set_room_overflow(self, room: str, **changes: str) -> None:
        """Changes the room's overflow_* fields (see RoomRecord); no change, no event."""
        record = self._rooms.get(room)
        if record is None:
            return
        changed = False
        for name, value in changes.items():
            field_name = f"overflow_{name}"
            if getattr(record, field_name) != value:
                setattr(record, field_name, value)
                changed = True
        if changed:
            self._emit(ChangeKind.ROOM_CHANGED, room, room_record=record.copy(with_stages=False))

    def room_publishing_changed(self, room: str) -> None:
        self._emit(ChangeKind.ROOM_CHANGED, room, room_record=self._rooms[room].copy(with_stages=False))

    def end_room(self, room: str) -> None:
        if self._rooms.pop(room, None) is not None:
            self._emit(ChangeKind.ROOM_ENDED, room)

    @contextmanager
    def subscribe(self, room_filter: str = "") -> Iterator[Subscription]:
        """Snapshot and subscription are taken together, so no change falls between them."""
        rooms = [r.copy() for r in self._rooms.values() if not room_filter or r.room == room_filter]
        subscription = Subscription(room_filter, rooms, self._revision, self._queue_limit)
        self._subscriptions.add(subscription)
        try:
            yield subscription
        finally:
            self._subscriptions.discard(subscription)

    async def wait_for(self, revision: int, within: float) -> bool:
        """True once this inventory includes `revision`; False after `within` seconds."""
        try:
            async with asyncio.timeout(within):
                while self._revision < revision:
                    await self._changed.wait()
        except TimeoutError:
            return False
        return True

    # --- a follower's copy: the leader's changes, replayed with the leader's revisions ----------

    def load(self, rooms: list[RoomRecord], revision: int) -> None:
        """Replaces everything with the leader's state at `revision`. Watchers started from an older
        snapshot cannot be patched up: they are told they fell behind, and start again."""
        self._rooms = {room.room: room for room in rooms}
        self._revision = revision
        for subscription in self._subscriptions:
            subscription.lose()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def apply(self, change: Change) -> None:
        """Replays one of the leader's changes (see shared_inventory.py)."""
        if change.revision <= self._revision:
            return  # already in the snapshot this copy was loaded from
        if change.kind is ChangeKind.ROOM_ENDED:
            self._rooms.pop(change.room, None)
        elif change.kind is ChangeKind.ROOM_CHANGED:
            assert change.room_record is not None
            record = change.room_record.copy(with_stages=False)
            existing = self._rooms.get(change.room)
            record.stages = existing.stages if existing is not None else {}
            self._rooms[change.room] = record
        else:
            assert change.stage is not None
            room = self._rooms.setdefault(change.room, RoomRecord(room=change.room, created_at=0.0))
            if change.kind is ChangeKind.STAGE_REMOVED:
                room.stages.pop(change.stage.index, None)
            else:
                room.stages[change.stage.index] = change.stage.copy()
        self._emit(change.kind, change.room, change.stage, change.room_record, revision=change.revision)

    def _emit(
        self,
        kind: ChangeKind,
        room: str,
        stage: StageRecord | None = None,
        room_record: RoomRecord | None = None,
        revision: int | None = None,
    ) -> None:
        self._revision = revision if revision is not None else self._revision + 1
        change = Change(self._revision, kind, room, stage, room_record)
        for subscription in self._subscriptions:
            subscription.offer(change)
        for listener in self._listeners:
            listener(change)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
