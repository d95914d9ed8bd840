"""Turns the stage manager's inventory change feed into room and Stage events in the outbox.

- stage.added: a Stage exists in IVS (it has an ARN and is STANDBY or LIVE) for the first time;
- stage.removed: an announced Stage left the inventory (deleted in IVS);
- room.live / room.standby: the broadcaster started / stopped publishing on the room's origins (not
  while the room is ending, and no room.standby for a room first seen not publishing);
- room.ended: the room is gone.

Each is recorded with the room's announced state (outbox.Transition), so a Stage that a restarted
stage manager recovers is not announced twice, nor a room that was already live.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.common.errors import Unavailable
from services.stagemanager.inventory import Change, ChangeKind, Inventory
from services.stagemanager.model import RoomRecord, StageRecord, StageState
from services.webhooks.events import EventType, WebhookEvent, room_event, stage_event
from services.webhooks.outbox import Outbox, Transition

log = logging.getLogger(__name__)

# A Stage in these states exists in IVS and can take viewers: the host app hears of it.
ANNOUNCED_STATES = frozenset({StageState.STANDBY, StageState.LIVE})
ROOM_SEEN = "room"
PUBLISHING = "publishing"
RECORD_RETRY_SECONDS = (0.5, 10.0)


def stage_field(stage: StageRecord) -> str:
    return f"stage:{stage.arn}"


@dataclass
class _Announced:
    """What this process has recorded for a room (the outbox holds the truth across processes)."""

    publishing: bool | None = None
    added: set[str] = field(default_factory=set)
    # Every Stage seen with an ARN, whatever its state: its removal may be news to the host app even
    # if this process never announced it (a restart recovered it draining).
    known: dict[str, StageRecord] = field(default_factory=dict)


class InventoryEvents:
    def __init__(
        self,
        inventory: Inventory,
        outbox: Outbox,
        on_recorded: Callable[[EventType], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._inventory = inventory
        self._outbox = outbox
        self._on_recorded = on_recorded
        self._clock = clock
        # The rooms as the feed tells them, and what has been recorded for each.
        self._rooms: dict[str, RoomRecord] = {}
        self._announced: dict[str, _Announced] = {}

    async def run(self) -> None:
        while True:
            with self._inventory.subscribe() as subscription:
                try:
                    await self._resync(subscription.snapshot)
                    while True:
                        await self.apply(await subscription.next())
                except Unavailable:
                    log.warning("webhook events fell behind the inventory; resynchronising")
                except Exception:
                    log.exception("webhook events failed; resynchronising")
                    await asyncio.sleep(RECORD_RETRY_SECONDS[1])
            await asyncio.sleep(0)

    async def apply(self, change: Change) -> None:
        if change.kind is ChangeKind.ROOM_ENDED:
            await self._end(change.room)
            return
        room = self._rooms.get(change.room)
        if room is None:
            room = self._rooms[change.room] = RoomRecord(room=change.room, created_at=0.0)
        if change.kind is ChangeKind.ROOM_CHANGED and change.room_record is not None:
            stages = room.stages
            room = self._rooms[change.room] = change.room_record.copy(with_stages=False)
            room.stages = stages
        elif change.stage is not None:
            if change.kind is ChangeKind.STAGE_REMOVED:
                room.stages.pop(change.stage.index, None)
            else:
                room.stages[change.stage.index] = change.stage.copy()
        await self._reconcile(room)

    async def _resync(self, snapshot: list[RoomRecord]) -> None:
        """After a gap (start, or a feed that fell behind): rooms gone meanwhile ended, the others
        are compared with what was announced."""
        rooms = {room.room: room for room in snapshot}
        for gone in [room for room in self._announced if room not in rooms]:
            await self._end(gone)
        self._rooms = rooms
        for room in rooms.values():
            await self._reconcile(room)

    async def _reconcile(self, room: RoomRecord) -> None:
        announced = self._announced.get(room.room)
        if announced is None:
            # Marks the room as seen: room.ended is recorded only for a room that was.
            await self._record(room.room, Transition.set(ROOM_SEEN), None)
            announced = self._announced[room.room] = _Announced()
        present = {stage.arn: stage for stage in room.stages.values() if stage.arn}
        for arn, stage in sorted(present.items(), key=lambda item: item[1].index):
            announced.known[arn] = stage
            if arn not in announced.added and stage.state in ANNOUNCED_STATES:
                await self._record(
                    room.room,
                    Transition.set(stage_field(stage)),
                    stage_event(EventType.STAGE_ADDED, stage, self._clock()),
                )
                announced.added.add(arn)
        for arn in [arn for arn in announced.known if arn not in present]:
            await self._remove(room.room, announced, arn)
        publishing = room.publishing
        if room.ending or publishing == announced.publishing:
            return
        if publishing:
            transition, event_type = Transition.set(PUBLISHING, "live"), EventType.ROOM_LIVE
        elif announced.publishing is not None:
            transition, event_type = Transition.set(PUBLISHING, "standby"), EventType.ROOM_STANDBY
        else:
            # First seen not publishing (a new room, or one recovered before its publisher is
            # confirmed): nothing changed that the host app was told.
            announced.publishing = False
            return
        await self._record(room.room, transition, room_event(event_type, room.room, self._clock()))
        announced.publishing = publishing

    async def _remove(self, room: str, announced: _Announced, arn: str) -> None:
        stage = announced.known.pop(arn)
        announced.added.discard(arn)
        await self._record(
            room,
            Transition.unset(stage_field(stage)),
            stage_event(EventType.STAGE_REMOVED, stage, self._clock()),
        )

    async def _end(self, room: str) -> None:
        self._rooms.pop(room, None)
        announced = self._announced.pop(room, None)
        if announced is not None:
            for arn in list(announced.known):
                await self._remove(room, announced, arn)
        await self._record(room, Transition.end(), room_event(EventType.ROOM_ENDED, room, self._clock()))

    async def _record(self, room: str, transition: Transition, event: WebhookEvent | None) -> None:
        """Records, waiting out an outbox outage: the feed keeps the changes meanwhile (or, if it
        overflows, the resync that follows compares the whole inventory)."""
        delay = RECORD_RETRY_SECONDS[0]
        while True:
            try:
                recorded = await self._outbox.record(room, transition, event)
                break
            except Unavailable as error:
                if delay == RECORD_RETRY_SECONDS[0]:
                    log.warning("webhook events of room %s wait: %s", room, error.message)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECORD_RETRY_SECONDS[1])
        if delay != RECORD_RETRY_SECONDS[0]:
            log.info("webhook events of room %s recorded again", room)
        if recorded and event is not None:
            self._on_recorded(event.type)
