"""Keeps every replica fed: starts, checks and repairs the replications from origins (DESIGN.md §5).

A replica Stage shows the broadcaster only while IVS replicates the origin's publishing participant
into it (StartParticipantReplication). The replicator runs when something may have changed it (the
broadcaster published or came back with a new participant id, a replica Stage was made, a replica's
publisher vanished, a restart) and every `replication_check_seconds` regardless, and for each
publishing origin:

- learns the participant to copy: the one the page reported, else the one IVS shows publishing;
- reads the replications IVS has for it (ListParticipantReplicas) and marks each replica ACTIVE or not,
  so a replica is LIVE (placeable) only while fed;
- starts the missing ones and stops those into Stages that are no longer its replicas, and those of a
  participant the broadcaster no longer is (a page that reconnected under a new id).

Each call goes through the IVS call budget; a refused start is reported on the replica and tried again
on the next pass, never in a tight loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from services.common.errors import FanoutError
from services.stagemanager.inventory import Inventory
from services.stagemanager.ivs import ReplicationApi
from services.stagemanager.metrics import StageManagerMetrics
from services.stagemanager.model import EXISTING_STATES, Replication, RoomRecord, StageRecord
from services.stagemanager.rooms import RoomManager, RoomSettings

log = logging.getLogger(__name__)


class Replicator:
    def __init__(
        self,
        rooms: RoomManager,
        inventory: Inventory,
        api: ReplicationApi,
        settings: RoomSettings,
        metrics: StageManagerMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rooms = rooms
        self._inventory = inventory
        self._api = api
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        # (origin ARN) -> the participant whose replications we started there, to stop them once the
        # broadcaster publishes as someone else.
        self._replicated: dict[str, str] = {}
        self._failing = False

    async def run(self) -> None:
        due = self._rooms.replication_due
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(due.wait(), self._settings.replication_check_seconds)
            due.clear()
            if not self._rooms.recovered:
                continue
            try:
                await self.run_pass()
            except Exception:
                log.exception("replication pass failed")

    async def run_pass(self) -> None:
        """One look at every origin of every room; IVS errors leave the rest for the next pass."""
        if self._settings.limits.replicas_per_origin == 0:
            return  # browser fan-out: the page publishes to every Stage itself
        failed = False
        for room in self._inventory.rooms():
            if room.ending:
                continue
            for origin in room.origins():
                try:
                    await self._check_origin(room, origin)
                except FanoutError as error:
                    failed = True
                    if not self._failing:
                        log.warning("room %s: replication check failed: %s", room.room, error.message)
        if self._failing and not failed:
            log.info("replication checks succeed again")
        self._failing = failed
        known = {origin.arn for room in self._inventory.rooms() for origin in room.origins()}
        for arn in set(self._replicated) - known:
            del self._replicated[arn]

    async def _check_origin(self, room: RoomRecord, origin: StageRecord) -> None:
        replicas = [r for r in room.replicas_of(origin) if r.arn and r.state in EXISTING_STATES]
        if not origin.arn or origin.state not in EXISTING_STATES:
            return
        if not origin.publishing:
            for replica in replicas:
                self._rooms.set_replication(room, replica, Replication.WAITING)
            return
        participant = origin.publisher_id or await self._api.publishing_participant(origin.arn) or ""
        if not participant:
            return  # the page said it publishes; IVS does not show it yet
        self._rooms.set_publisher_id(origin, participant)
        previous = self._replicated.get(origin.arn)
        if previous and previous != participant:
            await self._stop_all(room, origin, previous)
        self._replicated[origin.arn] = participant
        active = await self._api.active_replicas(origin.arn, participant)
        wanted = {replica.arn for replica in replicas}
        # Only into this room's other Stages: a replication into someone else's Stage is not ours.
        ours = {stage.arn for stage in room.stages.values() if stage.arn}
        for destination in sorted((active - wanted) & ours):
            log.info("room %s: stopping a replication into %s: not a replica of it", room.room, destination)
            await self._api.stop(origin.arn, destination, participant)
        for replica in replicas:
            if replica.arn in active:
                self._rooms.set_replication(room, replica, Replication.ACTIVE)
            else:
                await self._start(room, origin, replica, participant)

    async def _start(
        self, room: RoomRecord, origin: StageRecord, replica: StageRecord, participant: str
    ) -> None:
        if replica.replication is Replication.ACTIVE:
            # IVS no longer lists it: viewers there see nothing until it is repaired.
            self._rooms.set_replication(room, replica, Replication.STOPPED, "the replication stopped")
        try:
            await self._api.start(
                origin.arn, replica.arn, participant, self._settings.replication_reconnect_seconds
            )
        except FanoutError as error:
            self._metrics.replication_starts.labels(room.room, "refused").inc()
            self._rooms.set_replication(room, replica, Replication.STOPPED, error.message)
            if error.code != "replication_refused":
                raise
            # Perhaps the page came back as a new participant without saying so: ask IVS next pass.
            self._rooms.set_publisher_id(origin, "")
            return
        self._metrics.replication_starts.labels(room.room, "started").inc()
        log.info(
            "room %s: replicating Stage %d into replica Stage %d", room.room, origin.index, replica.index
        )
        self._rooms.set_replication(room, replica, Replication.ACTIVE)

    async def _stop_all(self, room: RoomRecord, origin: StageRecord, participant: str) -> None:
        """The broadcaster is someone else now: its old self's replications would show a frozen copy."""
        for destination in sorted(await self._api.active_replicas(origin.arn, participant)):
            await self._api.stop(origin.arn, destination, participant)
        log.info("room %s: the broadcaster on Stage %d has a new participant id", room.room, origin.index)
