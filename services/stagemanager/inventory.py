"""The stage manager's inventory and its ordered change feed (the source of WatchRoom)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
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

    async def next(self) -> Change:
        if self._lost:
            raise Unavailable("watcher fell behind; reconnect for a fresh snapshot", code="watch_lagged")
        return await self._queue.get()


class Inventory:
    """Rooms and Stages in memory; every mutation gets a revision and goes to every watcher."""

    def __init__(self, watcher_queue_limit: int = 10_000) -> None:
        self._rooms: dict[str, RoomRecord] = {}
        # Starts from the wall clock so revisions keep increasing across a restart (see RoomEvent).
        self._revision = time.time_ns() // 1_000
        self._subscriptions: set[Subscription] = set()
        self._queue_limit = watcher_queue_limit

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

    def _emit(
        self,
        kind: ChangeKind,
        room: str,
        stage: StageRecord | None = None,
        room_record: RoomRecord | None = None,
    ) -> None:
        self._revision += 1
        change = Change(self._revision, kind, room, stage, room_record)
        for subscription in self._subscriptions:
            subscription.offer(change)
