"""Reads room occupancy from the allocator over gRPC for the autoscaler."""

from __future__ import annotations

import grpc

from protos.fanout.v1 import allocator_pb2, allocator_pb2_grpc
from services.common.errors import Unavailable
from services.stagemanager.autoscaler import RoomLoad


class AllocatorOccupancy:
    def __init__(self, stub: allocator_pb2_grpc.AllocatorStub, timeout_seconds: float = 2.0) -> None:
        self._stub = stub
        self._timeout = timeout_seconds

    async def fetch(self) -> dict[str, RoomLoad]:
        try:
            response = await self._stub.GetOccupancy(
                allocator_pb2.GetOccupancyRequest(), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as error:
            raise Unavailable(f"allocator GetOccupancy failed: {error.code().name}") from None
        viewers: dict[str, dict[str, int]] = {}
        for stage in response.stages:
            viewers.setdefault(stage.room, {})[stage.stage_arn] = stage.viewers
        return {
            room.room: RoomLoad(viewers=viewers.get(room.room, {}), joins_total=room.joins_total)
            for room in response.rooms
        }
