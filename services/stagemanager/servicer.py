"""The StageManager gRPC API: decode, call the room manager, encode."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from protos.fanout.v1 import stagemanager_pb2, stagemanager_pb2_grpc
from services.common.ids import check_room_id
from services.stagemanager.convert import change_to_proto, room_to_proto, stage_to_proto
from services.stagemanager.forwarding import REVISION_METADATA, LeaderRoute
from services.stagemanager.inventory import Inventory
from services.stagemanager.rooms import RoomManager, StageObservation


class StageManagerServicer(stagemanager_pb2_grpc.StageManagerServicer):
    """Reads are answered by any replica from its inventory; writes by the leader (a follower
    forwards them, see forwarding.py)."""

    def __init__(self, rooms: RoomManager, inventory: Inventory, route: LeaderRoute) -> None:
        self._rooms = rooms
        self._inventory = inventory
        self._route = route

    async def EnsureRoom(
        self, request: stagemanager_pb2.EnsureRoomRequest, context: grpc.aio.ServicerContext
    ) -> stagemanager_pb2.EnsureRoomResponse:
        if not self._route.local:
            return await self._route.forward("EnsureRoom", request, context)
        room, created, revision = await self._rooms.ensure_room(request.room)
        self._tell_revision(context)
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
        if not self._route.local:
            return await self._route.forward("EndRoom", request, context)
        await self._rooms.end_room(request.room)
        self._tell_revision(context)
        return stagemanager_pb2.EndRoomResponse()

    async def ReportPublisherStatus(
        self, request: stagemanager_pb2.ReportPublisherStatusRequest, context: grpc.aio.ServicerContext
    ) -> stagemanager_pb2.ReportPublisherStatusResponse:
        if not self._route.local:
            return await self._route.forward("ReportPublisherStatus", request, context)
        stage = await self._rooms.report_publisher_status(
            request.room, request.stage_arn, request.publishing, request.participant_id
        )
        self._tell_revision(context)
        return stagemanager_pb2.ReportPublisherStatusResponse(stage=stage_to_proto(stage))

    async def ReportObservations(
        self, request: stagemanager_pb2.ReportObservationsRequest, context: grpc.aio.ServicerContext
    ) -> stagemanager_pb2.ReportObservationsResponse:
        if not self._route.local:
            return await self._route.forward("ReportObservations", request, context)
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
        self._tell_revision(context)
        return stagemanager_pb2.ReportObservationsResponse()

    def _tell_revision(self, context: grpc.aio.ServicerContext) -> None:
        # After the write: the revision that includes it, for a follower that forwarded it to wait for.
        context.set_trailing_metadata(((REVISION_METADATA, str(self._inventory.revision)),))

    async def WatchRoom(
        self, request: stagemanager_pb2.WatchRoomRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[stagemanager_pb2.RoomEvent]:
        if request.room:
            check_room_id(request.room)
        # A snapshot taken mid-recovery would lack Stages that exist, and a watcher would take their
        # absence for removal: the stream starts once the inventory is whole.
        await self._rooms.wait_readable()
        with self._inventory.subscribe(request.room) as subscription:
            snapshot = stagemanager_pb2.RoomEvent(revision=subscription.revision)
            snapshot.snapshot.rooms.extend(room_to_proto(room) for room in subscription.snapshot)
            snapshot.snapshot.complete = True
            yield snapshot
            while True:
                yield change_to_proto(await subscription.next())
