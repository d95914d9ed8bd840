"""Rooms and the lifecycle of their Stages: create, go live, end, and recover after a restart."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from services.common.capacity import CapacityLimits
from services.common.errors import FanoutError, InvalidArgument, NoCapacity, NotFound, Unavailable
from services.common.ids import check_participant_id, check_room_id, check_stage_arn
from services.common.lifecycle import cancel_and_wait
from services.common.stage_tags import (
    TAG_CLUSTER,
    TAG_DRAINING,
    TAG_ENDING,
    TAG_INDEX,
    TAG_ORIGIN,
    TAG_ROLE,
    TAG_ROOM,
)
from services.stagemanager.inventory import Inventory
from services.stagemanager.ivs import IvsStage, StageApi, StageQuotaExceeded
from services.stagemanager.metrics import StageManagerMetrics
from services.stagemanager.model import (
    EXISTING_STATES,
    ORIGIN,
    REPLICA,
    Replication,
    RoomRecord,
    StageRecord,
    StageState,
)
from services.stagemanager.overflow import OverflowManager
from services.stagemanager.topology import next_slot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageObservation:
    room: str
    stage_arn: str
    publishers: int
    observed_at: float


@dataclass(frozen=True)
class RoomSettings:
    cluster_id: str
    limits: CapacityLimits = field(default_factory=CapacityLimits)
    min_stages: int = 1
    create_attempts: int = 3
    # How often every origin's replications are checked in IVS, besides each change that asks for it.
    replication_check_seconds: float = 10.0
    # A replication outlives a publisher drop this long, so a page that reconnects with the same
    # participant keeps its replicas (StartParticipantReplication's reconnectWindowSeconds).
    replication_reconnect_seconds: int = 10
    # A publisher the monitor does not see is only gone once the page's own report is this old.
    publisher_grace_seconds: float = 10.0


class RoomManager:
    """Owns every room of this cluster and keeps IVS and the inventory in step."""

    def __init__(
        self,
        inventory: Inventory,
        stages: StageApi,
        settings: RoomSettings,
        metrics: StageManagerMetrics,
        clock: Callable[[], float] = time.time,
        overflow: OverflowManager | None = None,
    ) -> None:
        self._metrics = metrics
        # Its channel and compositions go before the Stages when a room ends.
        self._overflow = overflow
        self._inventory = inventory
        self._stages = stages
        self._settings = settings
        self._clock = clock
        self._locks: dict[str, asyncio.Lock] = {}
        self._recovered = asyncio.Event()
        self._readable = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        # CreateStage calls in flight per room: an ending waits for them, so none outlives its room.
        self._provisioning: dict[str, set[asyncio.Task[None]]] = {}
        # Set when something may need a replication started or stopped (see Replicator).
        self.replication_due = asyncio.Event()

    @property
    def recovered(self) -> bool:
        """This replica may act: it leads and its inventory agrees with IVS (see recover)."""
        return self._recovered.is_set()

    def mark_readable(self) -> None:
        """The inventory is whole without a recovery here: a follower loaded the leader's from Redis."""
        self._readable.set()

    async def wait_readable(self) -> None:
        await self._readable.wait()

    def _lock(self, room: str) -> asyncio.Lock:
        return self._locks.setdefault(room, asyncio.Lock())

    def _require_recovered(self) -> None:
        # Before the inventory is rebuilt, a missing room or Stage may still exist in IVS: creating
        # Stages could duplicate them.
        if not self._recovered.is_set():
            raise Unavailable("the stage manager is still recovering its inventory", retry_after=2)

    def _require_readable(self) -> None:
        # Before the inventory is whole, "not found" could be a lie.
        if not self._readable.is_set():
            raise Unavailable("the stage manager is still recovering its inventory", retry_after=2)

    async def recover(self) -> int:
        """Adopts this cluster's Stages from IVS (tags), ignoring every other Stage, and finishes the
        ending of rooms that were being ended. Safe to call again after a failure. Returns the count.

        The inventory may already hold the previous leader's state (loaded from Redis): then this
        reconciles it with IVS in one ListStages pass, calling GetStage only for Stages it does not
        know (made after the old leader's last write), and finishes what the old leader left half
        done (a Stage being created, deleted, a room being ended)."""
        found = await self._stages.list_cluster_stages(self._settings.cluster_id)
        now = self._clock()
        self._reconcile_known(found)
        # A room with an ending tag on any Stage was being ended: it is deleted, never revived.
        endings = {s.tags.get(TAG_ROOM, ""): s.arn for s in found if s.tags.get(TAG_ENDING)}
        for known in self._inventory.rooms():
            if known.ending:
                endings.setdefault(known.room, "")
        adopted = 0
        for summary in sorted(found, key=lambda s: (s.tags.get(TAG_ROOM, ""), _index_tag(s.tags))):
            room_id = summary.tags.get(TAG_ROOM, "")
            try:
                check_room_id(room_id)
            except FanoutError:
                log.warning("ignoring Stage %s: its %s tag is not a room id", summary.arn, TAG_ROOM)
                continue
            room = self._inventory.room(room_id)
            if room is not None and room.stage_by_arn(summary.arn) is not None:
                continue  # known: adopted by an earlier attempt, or written by the old leader
            try:
                described = await self._stages.get_stage(summary.arn)
            except NotFound:
                continue
            ending = room_id in endings
            if room is None:
                room = RoomRecord(room=room_id, created_at=now, ending=ending)
                self._inventory.add_room(room)
            index = _index_tag(summary.tags)
            if index < 0 or index in room.stages:
                index = room.next_index()
            if ending:
                state = StageState.DELETING
            elif summary.tags.get(TAG_DRAINING):
                state = StageState.DRAINING
            else:
                # Publishing is not known until the page or the monitor says so.
                state = StageState.STANDBY
            role = REPLICA if summary.tags.get(TAG_ROLE) == REPLICA else ORIGIN
            self._inventory.add_stage(
                StageRecord(
                    room=room_id,
                    index=index,
                    state=state,
                    created_at=now,
                    role=role,
                    origin=_int_tag(summary.tags, TAG_ORIGIN) if role == REPLICA else -1,
                    replication=Replication.WAITING if role == REPLICA else Replication.NONE,
                    arn=described.arn,
                    events_url=described.events_url,
                    whip_url=described.whip_url,
                    ready_at=now,
                )
            )
            room.active_at = now
            adopted += 1
        for room_id, marker in sorted(endings.items()):
            if self._inventory.room(room_id) is not None:
                log.info("room %s was being ended: finishing the ending", room_id)
                self._spawn(self._delete_room(room_id, marker))
        self._drain_orphan_replicas()
        self._recovered.set()
        self._readable.set()
        self.replication_due.set()
        log.info("recovered %d Stage(s) in %d room(s)", adopted, len(self._inventory.rooms()))
        return adopted

    def _reconcile_known(self, found: list[IvsStage]) -> None:
        in_ivs = {stage.arn for stage in found}
        for room in self._inventory.rooms():
            for stage in list(room.stages.values()):
                if stage.state is StageState.FAILED:
                    continue
                if not stage.arn or stage.arn not in in_ivs:
                    # Never made (a CreateStage the old leader did not see answered: if it succeeded,
                    # the Stage is in `found` and is adopted), or deleted since the last write.
                    self._inventory.remove_stage(stage)
                elif stage.state is StageState.DELETING and not room.ending:
                    self._spawn(self._delete_stage(stage))

    def _drain_orphan_replicas(self) -> None:
        """A replica whose origin is gone (deleted before a restart) has no feed: it drains."""
        for room in self._inventory.rooms():
            origins = {stage.index for stage in room.origins()}
            for stage in list(room.stages.values()):
                if stage.role == REPLICA and stage.origin not in origins:
                    log.warning(
                        "room %s: replica Stage %d has no origin; draining it", room.room, stage.index
                    )
                    self.drain(stage)

    async def ensure_room(self, room_id: str) -> tuple[RoomRecord, bool, int]:
        """Creates the room (or tops it up) to the minimum pool; returns (room, created, revision)."""
        check_room_id(room_id)
        self._require_recovered()
        self._refuse_if_ending(room_id)
        async with self._lock(room_id):
            self._refuse_if_ending(room_id)
            room = self._inventory.room(room_id)
            created = room is None
            if room is None:
                room = RoomRecord(room=room_id, created_at=self._clock())
                self._inventory.add_room(room)
                log.info("room %s created", room_id)
            room.active_at = self._clock()
            for stage in [s for s in room.stages.values() if s.state is StageState.FAILED]:
                self._inventory.remove_stage(stage)
            usable = [s for s in room.stages.values() if s.state in EXISTING_STATES]
            missing = self._settings.min_stages - len(usable)
            if missing > 0:
                await asyncio.gather(*self.create_stages(room, missing))
            if not any(s.state in EXISTING_STATES for s in room.stages.values()):
                error = room.last_error or "no Stage could be created"
                raise NoCapacity(f"room {room_id} has no Stage: {error}", code="no_stage", retry_after=30)
            return room.copy(), created, self._inventory.revision

    def _refuse_if_ending(self, room_id: str) -> None:
        room = self._inventory.room(room_id)
        if room is not None and room.ending:
            raise Unavailable(
                f"room {room_id} is ending; it can start again once its Stages are deleted",
                code="room_ending",
                retry_after=2,
            )

    def create_stages(self, room: RoomRecord, count: int) -> list[asyncio.Task[None]]:
        """Adds up to `count` PROVISIONING Stages at once, each where the topology has a place for it
        (see topology.next_slot), and provisions them in the background."""
        tasks = []
        for _ in range(count):
            slot = next_slot(room, self._settings.limits)
            if slot is None:
                break
            record = StageRecord(
                room=room.room,
                index=room.next_index(),
                state=StageState.PROVISIONING,
                created_at=self._clock(),
                role=slot.role,
                origin=slot.origin,
                replication=Replication.WAITING if slot.role == REPLICA else Replication.NONE,
                during_show=room.publishing,
            )
            self._inventory.add_stage(record)
            task = self._spawn(self._provision(room, record))
            in_flight = self._provisioning.setdefault(room.room, set())
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            tasks.append(task)
        return tasks

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _provision(self, room: RoomRecord, record: StageRecord) -> None:
        tags = {
            TAG_CLUSTER: self._settings.cluster_id,
            TAG_ROOM: room.room,
            TAG_INDEX: str(record.index),
            TAG_ROLE: record.role,
        }
        if record.role == REPLICA:
            tags[TAG_ORIGIN] = str(record.origin)
        name = f"fanout-{self._settings.cluster_id}-{room.room}-{record.index}"[:128]
        for attempt in range(1, self._settings.create_attempts + 1):
            started = time.monotonic()
            try:
                created = await self._stages.create_stage(name, tags)
            except StageQuotaExceeded as error:
                # Retrying a quota error in a loop only burns the call budget: report it once.
                self._fail(room, record, error.message, "quota")
                return
            except Unavailable as error:
                if attempt == self._settings.create_attempts:
                    self._fail(room, record, f"CreateStage failed {attempt} times: {error.message}", "error")
                    return
                await asyncio.sleep(0.5 * 2**attempt)
                continue
            self._inventory.update_stage(
                record,
                arn=created.arn,
                events_url=created.events_url,
                whip_url=created.whip_url,
                # Made for a room that began ending meanwhile: the ending deletes it.
                state=StageState.DELETING if record.state is StageState.DELETING else StageState.STANDBY,
                ready_at=self._clock(),
            )
            self._inventory.set_room_error(room.room, "")
            if record.role == REPLICA:
                self.replication_due.set()
            self._metrics.provisioning.observe(max(0.0, self._clock() - record.created_at))
            log.info(
                "room %s: Stage %d created (%s) in %.0f ms",
                room.room,
                record.index,
                created.arn,
                (time.monotonic() - started) * 1000,
            )
            return

    def _fail(self, room: RoomRecord, record: StageRecord, message: str, reason: str) -> None:
        self._metrics.creation_failures.labels(room.room, reason).inc()
        # Reported once per distinct error, not once per refused Stage.
        if room.last_error != message:
            log.error("room %s: cannot create a Stage: %s", room.room, message)
        self._inventory.update_stage(record, state=StageState.FAILED, failure=reason)
        self._inventory.set_room_error(room.room, message)

    def get_room(self, room_id: str) -> tuple[RoomRecord, int]:
        check_room_id(room_id)
        self._require_readable()
        room = self._inventory.room(room_id)
        if room is None:
            raise NotFound(f"room {room_id} does not exist", code="room_not_found")
        return room.copy(), self._inventory.revision

    def list_rooms(self) -> tuple[list[RoomRecord], int]:
        self._require_readable()
        return [room.copy() for room in self._inventory.rooms()], self._inventory.revision

    async def report_publisher_status(
        self, room_id: str, arn: str, publishing: bool, participant_id: str = ""
    ) -> StageRecord:
        """The broadcaster's fast path: STANDBY becomes LIVE when it publishes, and back when it stops.
        `participant_id` (the publisher token's jti) is what replication copies into the replicas."""
        check_room_id(room_id)
        check_stage_arn(arn)
        if participant_id:
            check_participant_id(participant_id)
        self._require_recovered()
        room = self._inventory.room(room_id)
        if room is None:
            raise NotFound(f"room {room_id} does not exist", code="room_not_found")
        stage = room.stage_by_arn(arn)
        if stage is None:
            raise NotFound("the Stage is not part of this room", code="stage_not_found")
        if stage.role == REPLICA:
            raise InvalidArgument(
                "the Stage is a replica: IVS copies the broadcaster into it; the page publishes to origins",
                code="stage_is_replica",
            )
        if publishing and participant_id and participant_id != stage.publisher_id:
            self._inventory.update_stage(stage, publisher_id=participant_id)
            self.replication_due.set()
        self._set_publishing(room, stage, publishing, self._clock())
        return stage.copy()

    def _set_publishing(self, room: RoomRecord, stage: StageRecord, publishing: bool, at: float) -> None:
        was_publishing = room.publishing
        stage_was_publishing = stage.publishing
        state = stage.state
        if publishing and state is StageState.STANDBY:
            state = StageState.LIVE
        elif not publishing and state is StageState.LIVE:
            state = StageState.STANDBY
        if publishing:
            room.active_at = max(room.active_at, at)
        if state is not stage.state or publishing != stage.publishing:
            first_live = not stage.live_at and state is StageState.LIVE
            live_at = at if first_live else stage.live_at
            self._inventory.update_stage(
                stage, state=state, publishing=publishing, publishing_since=at, live_at=live_at
            )
            if first_live and stage.lead_time is not None:
                self._metrics.lead_time.observe(stage.lead_time)
            log.info("room %s: Stage %d %s (publishing=%s)", room.room, stage.index, state.value, publishing)
        if stage.role == ORIGIN and publishing != stage_was_publishing:
            self._origin_publishing_changed(room, stage, publishing, at)
        if room.publishing != was_publishing:
            self._inventory.room_publishing_changed(room.room)

    def _origin_publishing_changed(
        self, room: RoomRecord, origin: StageRecord, publishing: bool, at: float
    ) -> None:
        """Replication copies a publisher: without one on the origin its replicas show nothing, and
        with one they must be (re)started."""
        if publishing:
            self.replication_due.set()
            return
        for replica in room.replicas_of(origin):
            if replica.state in EXISTING_STATES and replica.replication is not Replication.WAITING:
                self._inventory.update_stage(replica, replication=Replication.WAITING, replication_error="")
                self._set_publishing(room, replica, False, at)

    def set_replication(
        self, room: RoomRecord, replica: StageRecord, replication: Replication, error: str = ""
    ) -> None:
        """What the replicator found or did: a replica is LIVE (placeable) only while ACTIVE."""
        if replica.replication is not replication or replica.replication_error != error:
            self._inventory.update_stage(replica, replication=replication, replication_error=error)
            if error:
                log.warning("room %s: replica Stage %d: %s", room.room, replica.index, error)
        active = replication is Replication.ACTIVE
        if replica.publishing != active:
            self._set_publishing(room, replica, active, self._clock())

    def set_publisher_id(self, origin: StageRecord, participant_id: str) -> None:
        if origin.publisher_id != participant_id:
            self._inventory.update_stage(origin, publisher_id=participant_id)

    def apply_observations(self, observations: list[StageObservation]) -> None:
        """The monitor's truth: a publisher seen confirms LIVE; one missing past the grace ends it."""
        for observation in observations:
            check_room_id(observation.room)
            check_stage_arn(observation.stage_arn)
        self._require_recovered()
        for observation in observations:
            room = self._inventory.room(observation.room)
            stage = room.stage_by_arn(observation.stage_arn) if room else None
            if room is None or stage is None:
                continue  # deleted since the monitor looked
            if observation.observed_at <= stage.publishing_since:
                continue  # older than what the page last reported
            if observation.publishers > 0 and not stage.publishing:
                if stage.role == REPLICA:
                    self.set_replication(room, stage, Replication.ACTIVE)
                else:
                    self._set_publishing(room, stage, True, observation.observed_at)
            elif (
                observation.publishers == 0
                and stage.publishing
                and observation.observed_at > stage.publishing_since + self._settings.publisher_grace_seconds
            ):
                log.warning("room %s: the publisher vanished from Stage %d", room.room, stage.index)
                if stage.role == REPLICA:
                    # Its replication stopped: the replicator restarts it if the origin still publishes.
                    self.set_replication(room, stage, Replication.STOPPED, "the replica's publisher vanished")
                    self.replication_due.set()
                else:
                    self._set_publishing(room, stage, False, observation.observed_at)

    async def end_room(self, room_id: str) -> None:
        """Records the ending in IVS first (a tag on one Stage), then marks every Stage DELETING and
        deletes them within the call budget. Idempotent. If recording fails nothing changes; once it
        succeeded, a restarted stage manager finishes the ending (see `recover`)."""
        check_room_id(room_id)
        self._require_recovered()
        room = self._inventory.room(room_id)
        if room is None:
            raise NotFound(f"room {room_id} does not exist", code="room_not_found")
        if room.ending:
            return
        marker = await self._record_ending(room)
        if room.ending or self._inventory.room(room_id) is not room:
            return  # another EndRoom got there during the call
        self._inventory.set_room_ending(room_id)
        for stage in room.stages.values():
            if stage.state is not StageState.DELETING:
                self._inventory.update_stage(stage, state=StageState.DELETING, publishing=False)
        log.info("room %s ending: deleting %d Stage(s)", room_id, len(room.stages))
        self._spawn(self._delete_room(room_id, marker))

    async def _record_ending(self, room: RoomRecord) -> str:
        """Tags one existing Stage as the room's ending marker; returns its ARN ("" if none exists yet)."""
        # A Stage taking viewers cannot be retired by the autoscaler meanwhile; a draining one could.
        order = {StageState.LIVE: 0, StageState.STANDBY: 0, StageState.DRAINING: 1}
        candidates = sorted(
            (s for s in room.stages.values() if s.arn and s.state in order),
            key=lambda s: (order[s.state], s.index),
        )
        for stage in candidates:
            try:
                await self._stages.tag_ending(stage.arn)
            except NotFound:
                continue  # deleted meanwhile: another Stage carries the mark
            return stage.arn
        return ""

    def reactivate(self, stage: StageRecord) -> None:
        """A DRAINING Stage takes viewers again: cheaper than creating one when demand returns."""
        if stage.state is StageState.DRAINING:
            state = StageState.LIVE if stage.publishing else StageState.STANDBY
            self._inventory.update_stage(stage, state=state)
            if stage.arn:
                self._spawn(self._stages.untag_draining(stage.arn))

    def drain(self, stage: StageRecord) -> None:
        """No new viewers; the Stage is deleted once its viewers are gone (see retire)."""
        if stage.state in (StageState.STANDBY, StageState.LIVE):
            self._inventory.update_stage(stage, state=StageState.DRAINING)
            # Tagged so that a restarted stage manager keeps draining it instead of filling it again.
            if stage.arn:
                self._spawn(self._stages.tag_draining(stage.arn))

    def retire(self, stage: StageRecord) -> None:
        """Deletes a drained, empty Stage."""
        if stage.state is StageState.DRAINING:
            self._inventory.update_stage(stage, state=StageState.DELETING)
            self._spawn(self._delete_stage(stage))

    def forget_failed(self, stage: StageRecord) -> None:
        if stage.state is StageState.FAILED:
            self._inventory.remove_stage(stage)

    async def _delete_room(self, room_id: str, marker_arn: str) -> None:
        """Deletes every Stage of an ending room, the one carrying the ending mark last."""
        async with self._lock(room_id):
            room = self._inventory.room(room_id)
            if room is None:
                return
            # A Stage still being created would otherwise outlive its room, untagged and adoptable.
            await asyncio.gather(*self._provisioning.get(room_id, ()), return_exceptions=True)
            if self._overflow is not None:
                # Before the Stages: the ending marker stays in IVS until the channel is gone, so a
                # restart mid-way finishes this too.
                await self._overflow.end_room(room)
            stages = list(room.stages.values())
            marked = [s for s in stages if marker_arn and s.arn == marker_arn]
            await asyncio.gather(*(self._delete_stage(s) for s in stages if s not in marked))
            await asyncio.gather(*(self._delete_stage(s) for s in marked))
            if not room.stages:
                self._inventory.end_room(room_id)
                self._provisioning.pop(room_id, None)
                log.info("room %s ended", room_id)

    async def _delete_stage(self, stage: StageRecord) -> None:
        """Deletes the Stage in IVS, retrying until IVS answers: a Stage left behind would be orphaned."""
        delay = 0.5
        while stage.arn:
            try:
                await self._stages.delete_stage(stage.arn)
                break
            except Unavailable as error:
                log.warning("DeleteStage %s failed: %s; retrying in %.1f s", stage.arn, error.message, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        self._inventory.remove_stage(stage)

    async def close(self) -> None:
        await cancel_and_wait(self._background)


def _index_tag(tags: dict[str, str] | object) -> int:
    return _int_tag(tags, TAG_INDEX)


def _int_tag(tags: dict[str, str] | object, key: str) -> int:
    value = tags.get(key, "") if isinstance(tags, dict) else ""
    return int(value) if isinstance(value, str) and value.isdigit() else -1
