"""Turns viewers against each room's ceiling into capacity.warning / capacity.exhausted (once per
crossing) and a periodic room.viewers summary for rooms that have viewers.

Viewers come from the allocator (GetOccupancy, as the autoscaler reads them); the ceiling from the one
capacity plan (services/common/capacity.py). An alarm fires when the room's viewers reach its share
of the ceiling and fires again only after they fell clearly below it (hysteresis), so a room hovering
at the line does not flood the host app.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.common.capacity import CapacityLimits, Ceiling, room_ceiling
from services.common.errors import FanoutError
from services.stagemanager.autoscaler import OccupancySource
from services.stagemanager.inventory import Inventory
from services.stagemanager.model import RoomRecord
from services.stagemanager.topology import placed
from services.webhooks.events import EventType, WebhookEvent, capacity_event, viewers_event
from services.webhooks.outbox import Outbox, Transition

log = logging.getLogger(__name__)

SUMMARY = "viewers-summary"


@dataclass(frozen=True)
class Alarm:
    event_type: EventType
    # Fires when viewers / ceiling reaches this; can fire again once it fell below `rearm_below`.
    fire_at: float
    rearm_below: float


ALARMS = (
    Alarm(EventType.CAPACITY_WARNING, fire_at=0.8, rearm_below=0.7),
    Alarm(EventType.CAPACITY_EXHAUSTED, fire_at=1.0, rearm_below=0.9),
)


def alarm_state(alarm: Alarm, viewers: int, ceiling_viewers: int) -> bool | None:
    """True: at or past the alarm's line (it fires unless it already has); False: far enough below
    it to fire again later; None: in between, nothing changes. A ceiling of 0 (the region's quota
    taken by other rooms) is full whatever the room holds."""
    used = viewers / ceiling_viewers if ceiling_viewers > 0 else math.inf
    if used >= alarm.fire_at:
        return True
    if used < alarm.rearm_below:
        return False
    return None


class OccupancyEvents:
    def __init__(
        self,
        inventory: Inventory,
        occupancy: OccupancySource,
        limits: CapacityLimits,
        outbox: Outbox,
        on_recorded: Callable[[EventType], None],
        check_seconds: float,
        summary_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._inventory = inventory
        self._occupancy = occupancy
        self._limits = limits
        self._outbox = outbox
        self._on_recorded = on_recorded
        self._check_seconds = check_seconds
        self._summary_seconds = summary_seconds
        self._clock = clock
        # What was last recorded (or found already recorded), so an unchanged room costs no call.
        self._alarms: dict[tuple[str, EventType], bool] = {}
        self._summarized: dict[str, int] = {}
        self._occupancy_down = False

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:
                log.exception("webhook capacity check failed")
            await asyncio.sleep(self._check_seconds)

    async def tick(self) -> None:
        try:
            loads = await self._occupancy.fetch()
        except FanoutError as error:
            if not self._occupancy_down:
                log.warning("capacity webhooks paused: occupancy unavailable (%s)", error.message)
            self._occupancy_down = True
            return
        self._occupancy_down = False
        now = self._clock()
        viewers = {room: sum(load.viewers.values()) for room, load in loads.items()}
        region_viewers = sum(viewers.values())
        rooms = self._inventory.rooms()
        all_stages = sum(len(placed(room)) for room in rooms)
        try:
            for room in rooms:
                # Ended (or ending) meanwhile: the host app has heard the last of it.
                if room.ending or self._inventory.room(room.room) is not room:
                    continue
                count = viewers.get(room.room, 0)
                ceiling = room_ceiling(
                    self._limits,
                    room.room,
                    other_rooms_stages=all_stages - len(placed(room)),
                    other_rooms_viewers=region_viewers - count,
                )
                await self._check_alarms(count, ceiling, now)
                await self._summarize(room, count, ceiling, now)
        except FanoutError as error:
            log.warning("capacity webhooks wait for the next check: %s", error.message)
        current = {room.room for room in rooms}
        self._alarms = {key: fired for key, fired in self._alarms.items() if key[0] in current}
        self._summarized = {room: bucket for room, bucket in self._summarized.items() if room in current}

    async def _check_alarms(self, viewers: int, ceiling: Ceiling, now: float) -> None:
        for alarm in ALARMS:
            state = alarm_state(alarm, viewers, ceiling.viewers)
            key = (ceiling.room, alarm.event_type)
            if state is None or self._alarms.get(key) == state:
                continue
            if state:
                event = capacity_event(alarm.event_type, viewers, ceiling, now)
                await self._record(ceiling.room, Transition.set(alarm.event_type.value), event)
            else:
                await self._record(ceiling.room, Transition.unset(alarm.event_type.value), None)
            self._alarms[key] = state

    async def _summarize(self, room: RoomRecord, viewers: int, ceiling: Ceiling, now: float) -> None:
        if self._summary_seconds <= 0 or viewers <= 0:
            return
        # One summary per period, whichever process or check makes it.
        period = int(now // self._summary_seconds)
        if self._summarized.get(room.room) == period:
            return
        event = viewers_event(viewers, ceiling, room.publishing, now)
        await self._record(room.room, Transition.set(SUMMARY, str(period)), event)
        self._summarized[room.room] = period

    async def _record(self, room: str, transition: Transition, event: WebhookEvent | None) -> None:
        if await self._outbox.record(room, transition, event) and event is not None:
            self._on_recorded(event.type)
