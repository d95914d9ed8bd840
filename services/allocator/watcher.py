"""Follows the stage manager's WatchRoom stream into the allocator's inventory, reconnecting as needed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Protocol

import grpc

from protos.fanout.v1 import common_pb2, stagemanager_pb2, stagemanager_pb2_grpc
from services.allocator.inventory import REPLICA_ROLE, StageInventory, StageView
from services.common.errors import FanoutError

log = logging.getLogger(__name__)

_STATE_PREFIX = len("STAGE_STATE_")


def stage_from_proto(stage: common_pb2.Stage) -> StageView:
    return StageView(
        arn=stage.arn,
        room=stage.room,
        index=stage.index,
        state=common_pb2.StageState.Name(stage.state)[_STATE_PREFIX:],
        events_url=stage.events_url,
        whip_url=stage.whip_url,
        role=REPLICA_ROLE if stage.role == common_pb2.STAGE_ROLE_REPLICA else "origin",
    )


# The overflow tier takes viewers while its channel exists and its composition is on its way or on
# air: a viewer sent there while it starts waits for the stream (the player retries), not for an error.
_OVERFLOW_SERVING = frozenset({common_pb2.OVERFLOW_STATE_STARTING, common_pb2.OVERFLOW_STATE_ACTIVE})


def overflow_url(room: common_pb2.Room) -> str:
    """The room's overflow playback URL while that tier takes viewers, else ""."""
    if room.ending or not room.HasField("overflow") or room.overflow.state not in _OVERFLOW_SERVING:
        return ""
    return room.overflow.playback_url


class RemovalListener(Protocol):
    """Told of explicit removals only: the leases on what is gone end with it."""

    async def stages_removed(self, stages: list[StageView]) -> None: ...

    async def room_ended(self, room: str, stages: list[StageView]) -> None: ...


class InventoryWatcher:
    """Keeps a StageInventory in step with the stage manager; `ready` once a complete snapshot is in.

    A Stage missing from a snapshot is dropped from the inventory but its leases stay: only an
    explicit stage_removed or room_ended ends leases. A restarted stage manager's snapshot must never
    cost viewers their seats, even if it were partial.
    """

    def __init__(
        self,
        stub: stagemanager_pb2_grpc.StageManagerStub,
        inventory: StageInventory,
        listener: RemovalListener,
    ) -> None:
        self._stub = stub
        self._inventory = inventory
        self._listener = listener
        self.ready = asyncio.Event()

    async def run(self) -> None:
        delay = 0.2
        while True:
            try:
                call = self._stub.WatchRoom(stagemanager_pb2.WatchRoomRequest())
                async for event in call:
                    await self._apply(event)
                    delay = 0.2
                log.warning("WatchRoom stream ended; reconnecting")
            except grpc.aio.AioRpcError as error:
                log.warning("WatchRoom failed (%s); reconnecting in %.1fs", error.code().name, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _apply(self, event: stagemanager_pb2.RoomEvent) -> None:
        kind = event.WhichOneof("event")
        inventory = self._inventory
        if kind == "snapshot":
            snapshot = event.snapshot
            rooms = [room.room for room in snapshot.rooms]
            ending = [room.room for room in snapshot.rooms if room.ending]
            stages = [stage_from_proto(s) for room in snapshot.rooms for s in room.stages]
            overflow = {room.room: overflow_url(room) for room in snapshot.rooms}
            if snapshot.complete:
                inventory.replace_all(rooms, ending, stages, event.revision, overflow)
                self.ready.set()
            else:
                inventory.merge(rooms, ending, stages, event.revision, overflow)
        elif kind in ("stage_added", "stage_changed"):
            inventory.put_stage(stage_from_proto(getattr(event, kind)), event.revision)
        elif kind == "stage_removed":
            removed = event.stage_removed
            gone = inventory.remove_stage(removed.room, removed.arn, event.revision)
            if removed.arn:
                # Known or not (this allocator may have started since), its leases end with it.
                await self._tell(self._listener.stages_removed([gone or stage_from_proto(removed)]))
        elif kind == "room_changed":
            changed = event.room_changed
            inventory.put_room(
                changed.room, event.revision, ending=changed.ending, overflow_url=overflow_url(changed)
            )
        elif kind == "room_ended":
            room = event.room_ended.room
            await self._tell(self._listener.room_ended(room, inventory.remove_room(room, event.revision)))

    @staticmethod
    async def _tell(call: Awaitable[None]) -> None:
        try:
            await call
        except FanoutError as error:
            # The stream goes on: those leases still lapse once their viewers stop renewing them.
            log.warning("leases of a removed Stage were not ended: %s", error.message)
