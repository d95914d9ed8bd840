"""The StageManager gRPC API: decode, call the room manager, encode."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from protos.fanout.v1 import stagemanager_pb2, stagemanager_pb2_grpc
from services.common.ids import check_room_id
from services.stagemanager.convert import change_to_proto, room_to_proto, stage_to_proto
from services.stagemanager.inventory import Inventory
from services.stagemanager.rooms import RoomManager, StageObservation


class StageManagerServicer(stagemanager_pb2_grpc.StageManagerServicer):
    def __init__(self, rooms: RoomManager, inventory: Inventory) -> None:
        self._rooms = rooms
        self._inventory = inventory

    async def EnsureRoom(
        self, request: stagemanager_pb2.EnsureRoomRequest, context: grpc.aio.ServicerContext
    ) -> stagemanager_pb2.EnsureRoomResponse:
        room, created, revision = await self._rooms.ensure_room(request.room)
        return stagemanager_pb2.EnsureRoomResponse(
            room=room_to_proto(room), created=created, revision=revision
        )

    async def GetRoom(
        self, request: stagemanager_pb2.GetRoomRequest, context: grpc.aio.ServicerContext
    ) -> stagemanager_pb2.GetRoomResponse:
        room, revision = self._rooms.get_room(request.room)
        return stagemanager_pb2.GetRoomResponse(room=room_to_proto(room), revision=revision)

    async def ListRooms(
        self, request: stagemanager_pb2.ListRoomsRequest, context: grpc.aio.ServicerContext
    ) -> stagemanager_pb2.ListRoomsResponse:
        rooms, revision = self._rooms.list_rooms()
        return stagemanager_pb2.ListRoomsResponse(rooms=[room_to_proto(r) for r in rooms], revision=revision)

    async def EndRoom(
        self, request: stagemanager_pb2.EndRoomRequest, context: grpc.aio.ServicerContext
    ) -> stagemanager_pb2.EndRoomResponse:
        await self._rooms.end_room(request.room)
        return stagemanager_pb2.EndRoomResponse()

    async def ReportPublisherStatus(
        self, request: stagemanager_pb2.ReportPublisherStatusRequest, context: grpc.aio.ServicerContext
    ) -> stagemanager_pb2.ReportPublisherStatusResponse:
        stage = await self._rooms.report_publisher_status(
            request.room, request.stage_arn, request.publishing, request.participant_id
        )
        return stagemanager_pb2.ReportPublisherStatusResponse(stage=stage_to_proto(stage))

    async def ReportObservations(
        self, request: stagemanager_pb2.ReportObservationsRequest, context: grpc.aio.ServicerContext
    ) -> stagemanager_pb2.ReportObservationsResponse:
        self._rooms.apply_observations(
            [
                StageObservation(
                    room=o.room,
                    stage_arn=o.stage_arn,
                    publishers=o.publishers,
                    observed_at=o.observed_at.ToNanoseconds() / 1e9,
                )
                for o in request.observations
            ]
        )
        return stagemanager_pb2.ReportObservationsResponse()

    async def WatchRoom(
        self, request: stagemanager_pb2.WatchRoomRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[stagemanager_pb2.RoomEvent]:
        if request.room:
            check_room_id(request.room)
        # A snapshot taken mid-recovery would lack Stages that exist, and a watcher would take their
        # absence for removal: the stream starts once the inventory is whole.
        await self._rooms.wait_recovered()
        with self._inventory.subscribe(request.room) as subscription:
            snapshot = stagemanager_pb2.RoomEvent(revision=subscription.revision)
            snapshot.snapshot.rooms.extend(room_to_proto(room) for room in subscription.snapshot)
            snapshot.snapshot.complete = True
            yield snapshot
            while True:
                yield change_to_proto(await subscription.next())
