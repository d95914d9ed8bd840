"""Grows each room's pool ahead of its audience and shrinks it behind (DESIGN.md §4)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from services.common.capacity import CapacityLimits, room_ceiling
from services.common.errors import FanoutError
from services.stagemanager.inventory import Inventory
from services.stagemanager.metrics import StageManagerMetrics
from services.stagemanager.model import ACTIVE_STATES, Replication, RoomRecord, StageRecord, StageState
from services.stagemanager.rooms import RoomManager
from services.stagemanager.topology import drain_candidates, emptiest, placed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AutoscalerSettings:
    # The capacity plan: soft capacity, the topology and the quotas no plan goes past.
    limits: CapacityLimits = field(default_factory=CapacityLimits)
    min_stages: int = 1
    min_free_slots: int = 25
    safety_factor: float = 1.5
    join_rate_window_seconds: float = 10.0
    # Until a room has measured its own CreateStage -> LIVE time.
    default_lead_time_seconds: float = 3.0
    scale_in_cooldown_seconds: float = 60.0
    room_idle_seconds: float = 1800.0
    # After the account's Stage quota refused a Stage, wait this long before asking again.
    quota_retry_seconds: float = 60.0
    tick_seconds: float = 1.0


@dataclass(frozen=True)
class RoomLoad:
    """What the allocator knows of a room: effective viewers per Stage and joins so far, the room's
    ceiling under the capacity plan (viewers; 0 when unknown) and its overflow tier's viewers."""

    viewers: Mapping[str, int]
    joins_total: int
    ceiling: int = 0
    overflow_viewers: int = 0


class OccupancySource(Protocol):
    async def fetch(self) -> dict[str, RoomLoad]: ...


@dataclass(frozen=True)
class Plan:
    create: int = 0
    reactivate: tuple[StageRecord, ...] = ()
    drain: StageRecord | None = None
    retire: tuple[StageRecord, ...] = ()
    free: int = 0
    wanted_free: float = 0.0


class JoinRate:
    """Joins per second over a short sliding window, from the allocator's monotonic join counter."""

    def __init__(self, window_seconds: float) -> None:
        self._window = window_seconds
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, joins_total: int) -> float:
        if self._samples and joins_total < self._samples[-1][1]:
            self._samples.clear()  # the allocator restarted: its counter began again
        self._samples.append((now, joins_total))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self._window:
            self._samples.popleft()
        first_at, first = self._samples[0]
        return (joins_total - first) / (now - first_at) if now > first_at else 0.0


def lead_time(room: RoomRecord, default: float, samples: int = 5) -> float:
    """Mean time from CreateStage to usable over the room's newest Stages: LIVE during a show,
    existing before one (nothing can go LIVE without a broadcaster)."""
    stages = sorted(room.stages.values(), key=lambda s: s.created_at, reverse=True)
    if room.publishing:
        times = [t for t in (s.lead_time for s in stages) if t is not None]
    else:
        times = [s.ready_at - s.created_at for s in stages if s.ready_at > s.created_at]
    times = times[:samples]
    return sum(times) / len(times) if times else default


def free_slots(room: RoomRecord, viewers: Mapping[str, int], capacity: int) -> int:
    """Soft capacity of the Stages that take viewers now or soon, minus the viewers on them. A
    replica whose replication IVS refused takes nobody until it is repaired, so it counts as full."""
    active = [s for s in room.stages.values() if s.state in ACTIVE_STATES]
    takes = [
        s for s in active if not (s.replication is Replication.STOPPED and s.state is not StageState.LIVE)
    ]
    return capacity * len(takes) - sum(viewers.get(s.arn, 0) for s in takes if s.arn)


def wanted_free_slots(join_rate: float, lead_seconds: float, settings: AutoscalerSettings) -> float:
    """Room for everyone who joins while a new Stage is being made, with a margin."""
    return max(float(settings.min_free_slots), join_rate * lead_seconds * settings.safety_factor)


def has_surplus(free: int, wanted: float, capacity: int) -> bool:
    return free - capacity > 2 * wanted


def plan_room(
    room: RoomRecord,
    viewers: Mapping[str, int],
    wanted: float,
    settings: AutoscalerSettings,
    surplus_ripe: bool,
    may_create: bool,
    region_left: int | None = None,
    stages_elsewhere: int = 0,
) -> Plan:
    """One tick's decision for one room; `surplus_ripe` says a surplus has outlasted the cooldown;
    `region_left` is how many more viewers the region's subscription quota admits, in every room;
    `stages_elsewhere` is how many Stages the deployment's other rooms hold (the Stage quota)."""
    stages = list(room.stages.values())
    active = [s for s in stages if s.state in ACTIVE_STATES]
    draining = [s for s in stages if s.state is StageState.DRAINING]
    capacity = settings.limits.soft_capacity
    free = free_slots(room, viewers, capacity)
    retire = tuple(s for s in draining if viewers.get(s.arn, 0) == 0)

    if free < wanted:
        missing = math.ceil((wanted - free) / capacity)
        # A draining Stage that still exists comes back before a new one is made: it costs no call.
        comeback = sorted(
            (s for s in draining if s not in retire), key=lambda s: viewers.get(s.arn, 0), reverse=True
        )[:missing]
        ceiling = room_ceiling(settings.limits, room.room, other_rooms_stages=stages_elsewhere)
        room_left = ceiling.stages - len(placed(room))
        if region_left is not None:
            # Past the regional quota no viewer can be placed, however many Stages there are.
            room_left = min(room_left, math.ceil(max(0, region_left - free) / capacity))
        create = min(missing - len(comeback), room_left) if may_create else 0
        return Plan(
            create=max(0, create), reactivate=tuple(comeback), retire=retire, free=free, wanted_free=wanted
        )

    drain = None
    usable = [s for s in active if s.arn and s.state is not StageState.PROVISIONING]
    if surplus_ripe and has_surplus(free, wanted, capacity) and len(usable) > settings.min_stages:
        drain = emptiest(drain_candidates(room, usable), viewers)
    return Plan(drain=drain, retire=retire, free=free, wanted_free=wanted)


@dataclass
class _RoomState:
    join_rate: JoinRate
    surplus_since: float | None = None
    quota_until: float = 0.0
    last_reason: str = ""
    failed_seen: set[int] = field(default_factory=set)


class Autoscaler:
    """Ticks over every room: creates, reactivates, drains and retires Stages; ends idle rooms."""

    def __init__(
        self,
        rooms: RoomManager,
        inventory: Inventory,
        occupancy: OccupancySource,
        settings: AutoscalerSettings,
        metrics: StageManagerMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._rooms = rooms
        self._inventory = inventory
        self._occupancy = occupancy
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._state: dict[str, _RoomState] = {}
        self._occupancy_down = False

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:
                log.exception("autoscaler tick failed")
            await asyncio.sleep(self._settings.tick_seconds)

    async def tick(self) -> None:
        if not self._rooms.recovered:
            return
        try:
            loads = await self._occupancy.fetch()
        except FanoutError as error:
            # Without occupancy nothing may be drained or deleted; say so once per outage.
            if not self._occupancy_down:
                log.warning("autoscaler paused: occupancy unavailable (%s)", error.message)
            self._occupancy_down = True
            return
        if self._occupancy_down:
            log.info("autoscaler resumed: occupancy available again")
            self._occupancy_down = False
        now = self._clock()
        region_viewers = sum(sum(load.viewers.values()) for load in loads.values())
        region_left = self._settings.limits.region_subscription_quota - region_viewers
        rooms = self._inventory.rooms()
        all_stages = sum(len(placed(room)) for room in rooms)
        for room in rooms:
            await self._scale_room(
                room,
                loads.get(room.room, RoomLoad({}, 0)),
                now,
                region_left,
                stages_elsewhere=all_stages - len(placed(room)),
            )
        for gone in set(self._state) - {room.room for room in self._inventory.rooms()}:
            del self._state[gone]

    async def _scale_room(
        self, room: RoomRecord, load: RoomLoad, now: float, region_left: int, stages_elsewhere: int
    ) -> None:
        settings = self._settings
        if room.ending:
            return
        state = self._state.setdefault(room.room, _RoomState(JoinRate(settings.join_rate_window_seconds)))
        if not room.publishing and now - max(room.active_at, room.created_at) > settings.room_idle_seconds:
            log.info("room %s ends: no publisher for %.0f s", room.room, settings.room_idle_seconds)
            self._metrics.autoscaler_decisions.labels(room.room, "end_idle").inc()
            try:
                await self._rooms.end_room(room.room)
            except FanoutError as error:
                log.warning(
                    "room %s: cannot end it yet (%s); trying again next tick", room.room, error.message
                )
            return
        self._track_quota(room, state, now)
        rate = state.join_rate.add(now, load.joins_total)
        lead = lead_time(room, settings.default_lead_time_seconds)
        wanted = wanted_free_slots(rate, lead, settings)
        capacity = settings.limits.soft_capacity
        if has_surplus(free_slots(room, load.viewers, capacity), wanted, capacity):
            state.surplus_since = state.surplus_since if state.surplus_since is not None else now
        else:
            state.surplus_since = None
        ripe = (
            state.surplus_since is not None
            and now - state.surplus_since >= settings.scale_in_cooldown_seconds
        )
        plan = plan_room(
            room,
            load.viewers,
            wanted,
            settings,
            ripe,
            may_create=now >= state.quota_until,
            region_left=region_left,
            stages_elsewhere=stages_elsewhere,
        )
        reason = (
            f"free {plan.free} < wanted {plan.wanted_free:.0f} (join rate {rate:.1f}/s x lead {lead:.1f}s)"
        )
        for stage in plan.reactivate:
            log.info("room %s: reactivate Stage %d: %s", room.room, stage.index, reason)
            self._metrics.autoscaler_decisions.labels(room.room, "reactivate").inc()
            self._rooms.reactivate(stage)
        if plan.create:
            log.info("room %s: create %d Stage(s): %s", room.room, plan.create, reason)
            self._metrics.autoscaler_decisions.labels(room.room, "scale_out").inc(plan.create)
            self._rooms.create_stages(room, plan.create)
        if plan.drain is not None:
            log.info(
                "room %s: drain Stage %d (%d viewers): free %d > 2 x wanted %.0f for %.0f s",
                room.room, plan.drain.index, load.viewers.get(plan.drain.arn, 0), plan.free,
                plan.wanted_free, settings.scale_in_cooldown_seconds,
            )  # fmt: skip
            self._metrics.autoscaler_decisions.labels(room.room, "drain").inc()
            self._rooms.drain(plan.drain)
            state.surplus_since = now
        for stage in plan.retire:
            log.info("room %s: delete drained Stage %d: no viewers left", room.room, stage.index)
            self._metrics.autoscaler_decisions.labels(room.room, "delete").inc()
            self._rooms.retire(stage)

    def _track_quota(self, room: RoomRecord, state: _RoomState, now: float) -> None:
        """A Stage refused for quota pauses creation in this room; failed records are cleared."""
        for stage in list(room.stages.values()):
            if stage.state is not StageState.FAILED:
                continue
            if stage.index not in state.failed_seen:
                state.failed_seen.add(stage.index)
                if stage.failure == "quota":
                    state.quota_until = now + self._settings.quota_retry_seconds
            if now - stage.created_at > self._settings.quota_retry_seconds:
                self._rooms.forget_failed(stage)
