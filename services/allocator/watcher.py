"""Follows the stage manager's WatchRoom stream into the allocator's inventory, reconnecting as needed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc

from protos.fanout.v1 import common_pb2, stagemanager_pb2, stagemanager_pb2_grpc
from services.allocator.inventory import StageInventory, StageView

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
    )


class InventoryWatcher:
    """Keeps a StageInventory in step with the stage manager; `ready` once the first snapshot is in."""

    def __init__(
        self,
        stub: stagemanager_pb2_grpc.StageManagerStub,
        inventory: StageInventory,
        on_removed: Callable[[list[StageView]], Awaitable[None]],
    ) -> None:
        self._stub = stub
        self._inventory = inventory
        self._on_removed = on_removed
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
        removed: list[StageView] = []
        if kind == "snapshot":
            rooms = [room.room for room in event.snapshot.rooms]
            stages = [stage_from_proto(s) for room in event.snapshot.rooms for s in room.stages]
            removed = inventory.replace_all(rooms, stages, event.revision)
            self.ready.set()
        elif kind in ("stage_added", "stage_changed"):
            inventory.put_stage(stage_from_proto(getattr(event, kind)), event.revision)
        elif kind == "stage_removed":
            gone = inventory.remove_stage(event.stage_removed.room, event.stage_removed.arn, event.revision)
            removed = [gone] if gone else []
        elif kind == "room_changed":
            inventory.put_room(event.room_changed.room, event.revision)
        elif kind == "room_ended":
            removed = inventory.remove_room(event.room_ended.room, event.revision)
        if removed:
            await self._on_removed(removed)
