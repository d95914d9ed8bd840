"""Reads room occupancy from the allocator over gRPC: the autoscaler every tick; the overflow tier and
the webhooks reuse its latest answer while it is recent, so the leader polls the allocator once."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc

from protos.fanout.v1 import allocator_pb2, allocator_pb2_grpc
from services.common.errors import Unavailable
from services.stagemanager.autoscaler import RoomLoad


class AllocatorOccupancy:
    def __init__(
        self,
        stub: allocator_pb2_grpc.AllocatorStub,
        timeout_seconds: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stub = stub
        self._timeout = timeout_seconds
        self._clock = clock
        self._latest: tuple[float, dict[str, RoomLoad]] | None = None

    def recent(self, max_age: float) -> RecentOccupancy:
        """A source that answers with this one's latest answer while it is at most `max_age` old."""
        return RecentOccupancy(self, max_age)

    def latest(self, max_age: float) -> dict[str, RoomLoad] | None:
        if self._latest is None or self._clock() - self._latest[0] > max_age:
            return None
        return self._latest[1]

    async def fetch(self) -> dict[str, RoomLoad]:
        loads = await self._fetch()
        self._latest = (self._clock(), loads)
        return loads

    async def _fetch(self) -> dict[str, RoomLoad]:
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
            room.room: RoomLoad(
                viewers=viewers.get(room.room, {}),
                joins_total=room.joins_total,
                ceiling=room.ceiling.viewers,
                overflow_viewers=room.overflow_viewers,
            )
            for room in response.rooms
        }


class RecentOccupancy:
    """The autoscaler's latest occupancy while it is recent enough, else a fetch of its own: for
    readers that poll less often than the autoscaler and need no fresher answer."""

    def __init__(self, source: AllocatorOccupancy, max_age: float) -> None:
        self._source = source
        self._max_age = max_age

    async def fetch(self) -> dict[str, RoomLoad]:
        recent = self._source.latest(self._max_age)
        return recent if recent is not None else await self._source.fetch()
