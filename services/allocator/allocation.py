"""Who watches where: viewer placement, leases, and the tokens that go with them (DESIGN.md §3, §6)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.allocator.inventory import KEEPS_VIEWERS, REPLICA_ROLE, StageInventory, StageView
from services.allocator.metrics import AllocatorMetrics
from services.allocator.observations import ObservedViewers
from services.allocator.overflow_seats import OverflowSeats
from services.allocator.placement import Candidate
from services.allocator.store import LeaseStore
from services.allocator.tokens import IssuedToken, StageEndpoints, TokenMinter
from services.common.capacity import CapacityLimits, Ceiling, room_ceiling
from services.common.errors import NoCapacity, NotFound, Unavailable
from services.common.ids import check_room_id, check_stage_arn, check_user_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlacementSettings:
    # The capacity plan (DESIGN.md §5): per-Stage limits, the topology and the region's quotas.
    limits: CapacityLimits = field(default_factory=CapacityLimits)
    lease_seconds: int = 60
    viewer_token_seconds: int = 12 * 3600
    publisher_token_seconds: int = 12 * 3600
    # How long IssuePublisherTokens waits for the WatchRoom stream to catch up with a revision.
    revision_wait_seconds: float = 5.0
    no_capacity_retry_after: int = 5
    # How long a monitor observation of a Stage's viewers stays good for placement decisions.
    observation_ttl_seconds: float = 30.0

    @property
    def soft_capacity(self) -> int:
        return self.limits.soft_capacity

    @property
    def hard_limit(self) -> int:
        return self.limits.stage_hard_limit

    @property
    def region_subscription_quota(self) -> int:
        """Concurrent subscriptions of the whole region, every room together (ivs-facts §3): one per
        viewer, since each subscribes to the one broadcaster."""
        return self.limits.region_subscription_quota


REALTIME = "realtime"
OVERFLOW = "overflow"


@dataclass(frozen=True)
class ViewerPlacement:
    """Where a viewer watches: a Stage (`token`), or past the ceiling the overflow tier (`playback_url`)."""

    room: str
    user_id: str
    token: IssuedToken | None
    lease_seconds: int
    sticky: bool
    tier: str = REALTIME
    playback_url: str = ""


@dataclass(frozen=True)
class RenewedLease:
    lease_seconds: int
    stage_arn: str  # "" in the overflow tier
    tier: str
    # Overflow tier: a Stage seat is free, so a new token request would take the viewer back to real time.
    realtime_available: bool = False


@dataclass(frozen=True)
class StageOccupancy:
    room: str
    stage_arn: str
    leased: int
    observed: int
    viewers: int
    capacity: int


@dataclass(frozen=True)
class RoomOccupancy:
    room: str
    viewers: int
    joins_total: int
    ceiling: Ceiling
    overflow_viewers: int = 0


@dataclass(frozen=True)
class Occupancy:
    stages: list[StageOccupancy]
    rooms: list[RoomOccupancy]
    # Viewers in every room together, as the regional subscription quota counts them.
    region_subscriptions: int


@dataclass(frozen=True)
class StageViewersObservation:
    room: str
    stage_arn: str
    subscribers: int
    observed_at: float


def _endpoints(stage: StageView) -> StageEndpoints:
    return StageEndpoints(arn=stage.arn, events_url=stage.events_url, whip_url=stage.whip_url)


class Allocator:
    """Places viewers on the least-loaded eligible Stage, atomically, through the lease store."""

    def __init__(
        self,
        inventory: StageInventory,
        store: LeaseStore,
        minter: TokenMinter,
        settings: PlacementSettings,
        metrics: AllocatorMetrics,
        overflow: OverflowSeats,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._inventory = inventory
        self._store = store
        self._overflow = overflow
        # Rooms with viewers in their overflow tier, as of the last occupancy refresh (every second)
        # or a seat handed out here since: only there may a new real-time viewer hold an overflow seat
        # to give back, so other joins make no call for it.
        self._overflow_occupied: set[str] = set()
        self._minter = minter
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._observed = ObservedViewers(settings.observation_ttl_seconds)

    @property
    def settings(self) -> PlacementSettings:
        return self._settings

    def _require_room(self, room: str) -> None:
        check_room_id(room)
        if not self._inventory.has_room(room):
            raise NotFound(f"room {room} does not exist", code="room_not_found")
        if self._inventory.is_ending(room):
            # The same answer as no room at all: a watch page waits for the next show either way.
            raise NotFound(f"room {room} has ended", code="room_not_found")

    async def assign_viewer(self, room: str, user_id: str) -> ViewerPlacement:
        started = time.perf_counter()
        check_user_id(user_id)
        try:
            self._require_room(room)
        except NotFound:
            self._metrics.assignment(room, "not_found")
            raise
        stages = {stage.arn: stage for stage in self._inventory.stages(room)}
        now = self._clock()
        candidates = [
            Candidate(stage.arn, stage.index, self._observed.subscribers(stage.arn, now))
            for stage in self._inventory.eligible(room)
        ]
        keep_on = [arn for arn, stage in stages.items() if stage.state in KEEPS_VIEWERS]
        settings = self._settings
        assignment = await self._store.assign(
            room,
            user_id,
            candidates,
            keep_on,
            settings.soft_capacity,
            settings.hard_limit,
            settings.lease_seconds,
            now,
            settings.region_subscription_quota,
        )
        if assignment is None:
            refusal = await self._refusal(room, now)
            playback_url = self._inventory.overflow_url(room)
            if refusal.code == "capacity_exhausted" and playback_url:
                return await self._overflow_seat(room, user_id, playback_url, now, started)
            self._metrics.assignment(room, "refused")
            raise refusal
        if not assignment.sticky and room in self._overflow_occupied:
            # Back in real time after an overflow seat (a Stage freed up): that seat is not held twice.
            await self._overflow.release(room, user_id)
        stage = stages[assignment.lease.stage_arn]
        token = await self._minter.mint(
            _endpoints(stage),
            user_id,
            publish=False,
            subscribe=True,
            attributes={"room": room, "role": "viewer"},
            ttl_seconds=settings.viewer_token_seconds,
        )
        self._metrics.assignment(room, "sticky" if assignment.sticky else "placed")
        self._metrics.assign_latency.observe(time.perf_counter() - started)
        return ViewerPlacement(room, user_id, token, settings.lease_seconds, assignment.sticky)

    async def _overflow_seat(
        self, room: str, user_id: str, playback_url: str, now: float, started: float
    ) -> ViewerPlacement:
        """Past the real-time ceiling: a seat in the room's overflow tier instead of a refusal."""
        assignment = await self._overflow.take(room, user_id, self._settings.lease_seconds, now)
        self._overflow_occupied.add(room)
        self._metrics.assignment(room, "overflow")
        self._metrics.assign_latency.observe(time.perf_counter() - started)
        return ViewerPlacement(
            room,
            user_id,
            None,
            self._settings.lease_seconds,
            assignment.sticky,
            tier=OVERFLOW,
            playback_url=playback_url,
        )

    async def _refusal(self, room: str, now: float) -> NoCapacity:
        """Which limit turned the viewer away (capacity_exhausted, naming it), or that the room's
        next Stages are still coming (no_capacity)."""
        settings = self._settings
        region = await self._store.region_leases(now)
        if region >= settings.region_subscription_quota:
            ceiling = room_ceiling(settings.limits, room, other_rooms_viewers=region)
            return NoCapacity(
                ceiling.refusal(), code="capacity_exhausted", retry_after=settings.no_capacity_retry_after
            )
        ceiling = self.ceiling(room, region, 0)
        stages = self._inventory.stages(room)
        eligible = {stage.arn for stage in self._inventory.eligible(room)}
        # A STANDBY Stage beside LIVE ones is a replica whose replication is (re)starting.
        coming = [stage for stage in stages if stage.state == "STANDBY" and stage.arn not in eligible]
        if len(stages) >= ceiling.stages and not coming:
            return NoCapacity(
                ceiling.refusal(), code="capacity_exhausted", retry_after=settings.no_capacity_retry_after
            )
        return NoCapacity(
            f"room {room} has no Stage that can take another viewer yet; more are coming",
            code="no_capacity",
            retry_after=settings.no_capacity_retry_after,
        )

    def ceiling(self, room: str, region_viewers: int, room_viewers: int) -> Ceiling:
        """The room's ceiling under the capacity plan, given what the deployment's other rooms hold."""
        return room_ceiling(
            self._settings.limits,
            room,
            other_rooms_stages=self._inventory.count() - self._inventory.count(room),
            other_rooms_viewers=max(0, region_viewers - room_viewers),
        )

    async def renew_viewer(self, room: str, user_id: str) -> RenewedLease:
        check_room_id(room)
        check_user_id(user_id)
        seconds, now = self._settings.lease_seconds, self._clock()
        lease = await self._store.renew(room, user_id, seconds, now)
        if lease is not None:
            return RenewedLease(seconds, lease.stage_arn, REALTIME)
        if await self._overflow.renew(room, user_id, seconds, now) is not None:
            return RenewedLease(seconds, "", OVERFLOW, await self._seat_free(room, now))
        raise NotFound("this viewer has no live lease; ask for a new token", code="lease_not_found")

    async def _seat_free(self, room: str, now: float) -> bool:
        """Whether a new viewer would get a Stage seat now: an eligible Stage below soft capacity (by
        leases and by what the monitor saw), within the region's quota. Only a hint: the seat is taken
        by whoever asks first."""
        settings = self._settings
        if await self._store.region_leases(now) >= settings.region_subscription_quota:
            return False
        counts = await self._store.counts(room, now)
        return any(
            max(counts.get(stage.arn, 0), self._observed.subscribers(stage.arn, now)) < settings.soft_capacity
            for stage in self._inventory.eligible(room)
        )

    async def release_viewer(self, room: str, user_id: str) -> bool:
        check_room_id(room)
        check_user_id(user_id)
        released = await self._store.release(room, user_id)
        if not released:
            released = await self._overflow.release(room, user_id)
        return released

    async def issue_publisher_tokens(
        self, room: str, user_id: str, min_revision: int, stage_arns: list[str]
    ) -> list[tuple[IssuedToken, str]]:
        """A publish token for each named (or every existing) Stage of the room, with its state."""
        check_room_id(room)
        check_user_id(user_id)
        for arn in stage_arns:
            check_stage_arn(arn)
        if not await self._inventory.wait_for_revision(min_revision, self._settings.revision_wait_seconds):
            raise Unavailable("the stage inventory is behind the stage manager", retry_after=1)
        self._require_room(room)
        # The page publishes to origins only; IVS replicates it into the replicas (DESIGN.md §5).
        stages = [
            stage
            for stage in self._inventory.stages(room)
            if stage.state in KEEPS_VIEWERS and stage.role != REPLICA_ROLE
        ]
        if stage_arns:
            wanted = set(stage_arns)
            stages = [stage for stage in stages if stage.arn in wanted]
            if len(stages) != len(wanted):
                raise NotFound("a named Stage is not an existing Stage of this room", code="stage_not_found")
        issued = []
        for stage in stages:
            token = await self._minter.mint(
                _endpoints(stage),
                user_id,
                publish=True,
                subscribe=False,
                attributes={"room": room, "role": "publisher"},
                ttl_seconds=self._settings.publisher_token_seconds,
            )
            issued.append((token, stage.state))
        return issued

    async def occupancy(self, room: str) -> Occupancy:
        """Per Stage: leased, observed, and max of both (what decisions use); per room: viewers, joins."""
        if room:
            check_room_id(room)
        now = self._clock()
        rooms = [room] if room else self._inventory.rooms()
        counts = {room: await self._store.counts(room, now)} if room else await self._store.rooms_counts(now)
        joins = await self._store.joins()
        stages = []
        for room_id in rooms:
            room_counts = counts.get(room_id, {})
            for stage in self._inventory.stages(room_id):
                leased = room_counts.get(stage.arn, 0)
                observed = self._observed.subscribers(stage.arn, now)
                stages.append(
                    StageOccupancy(
                        room_id,
                        stage.arn,
                        leased,
                        observed,
                        max(leased, observed),
                        self._settings.soft_capacity,
                    )
                )
        region = await self._store.region_leases(now)
        overflow = await self._overflow_viewers(room, now)
        summaries = []
        for room_id in rooms:
            viewers = sum(counts.get(room_id, {}).values())
            ceiling = self.ceiling(room_id, region, viewers)
            summaries.append(
                RoomOccupancy(room_id, viewers, joins.get(room_id, 0), ceiling, overflow.get(room_id, 0))
            )
        return Occupancy(stages, summaries, region)

    async def _overflow_viewers(self, room: str, now: float) -> dict[str, int]:
        """Overflow seats per room (`room`, or every room when empty)."""
        if room:
            return {room: await self._overflow.viewers(room, now)}
        return await self._overflow.viewers_by_room(now)

    def record_observations(self, observations: list[StageViewersObservation]) -> None:
        for observation in observations:
            check_room_id(observation.room)
            check_stage_arn(observation.stage_arn)
        for observation in observations:
            self._observed.record(observation.stage_arn, observation.subscribers, observation.observed_at)

    async def reap_expired(self) -> int:
        expired = await self._store.reap(self._clock())
        expired += await self._overflow.reap(self._clock())
        for lease in expired:
            self._metrics.reaped.labels(lease.room).inc()
        if expired:
            log.info("reaped %d expired viewer lease(s)", len(expired))
        return len(expired)

    async def refresh_metrics(self) -> None:
        occupancy = await self.occupancy("")
        self._metrics.publish_occupancy(
            ((s.room, s.stage_arn, s.leased, s.observed, s.viewers) for s in occupancy.stages),
            {r.room: r.viewers for r in occupancy.rooms},
            {r.room: r.overflow_viewers for r in occupancy.rooms},
        )
        self._overflow_occupied = {r.room for r in occupancy.rooms if r.overflow_viewers}
        self._metrics.region_subscriptions.set(occupancy.region_subscriptions)
        self._metrics.region_subscription_quota.set(self._settings.region_subscription_quota)

    async def stages_removed(self, stages: list[StageView]) -> None:
        """Leases on a deleted Stage end with it."""
        for stage in stages:
            self._observed.forget(stage.arn)
            await self._store.drop_stage(stage.room, stage.arn)

    async def room_ended(self, room: str, stages: list[StageView]) -> None:
        """Every lease of an ended room ends, on whichever Stage it was (known here or not)."""
        for stage in stages:
            self._observed.forget(stage.arn)
        dropped = await self._store.drop_room(room)
        dropped += await self._overflow.drop_room(room)
        if dropped:
            log.info("room %s ended: released %d viewer lease(s)", room, dropped)
