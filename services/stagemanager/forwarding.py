"""Writes reach the leader: a follower passes them on, unchanged, to the replica that leads."""

from __future__ import annotations

from typing import Any

import grpc
from redis.exceptions import RedisError

from protos.fanout.v1 import stagemanager_pb2_grpc
from services.common.errors import Unavailable
from services.stagemanager.inventory import Inventory
from services.stagemanager.leadership import LeaderLease, Leadership

_DEFAULT_TIMEOUT_SECONDS = 30.0
_CATCH_UP_SECONDS = 5.0
# Trailing metadata of every write the leader answers: the inventory revision that includes it.
REVISION_METADATA = "x-fanout-revision"


def _revision(metadata: Any) -> int:
    for key, value in metadata or ():
        if key == REVISION_METADATA:
            return int(value)
    return 0


class LeaderRoute:
    """This replica if it leads; otherwise the leader named in the lease."""

    def __init__(
        self, leadership: Leadership, inventory: Inventory, lease: LeaderLease | None = None
    ) -> None:
        self._leadership = leadership
        self._inventory = inventory
        self._lease = lease
        self._channels: dict[str, grpc.aio.Channel] = {}

    @property
    def local(self) -> bool:
        return self._lease is None or self._leadership.is_leader

    async def forward(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Calls `method` on the leader; its answer, or its error status and metadata, become ours."""
        assert self._lease is not None
        try:
            leader = await self._lease.leader()
        except (RedisError, OSError) as error:
            raise Unavailable(
                f"cannot tell which replica leads: Redis {type(error).__name__}",
                code="no_leader",
                retry_after=1,
            ) from None
        if leader is None or leader.holder == self._lease.holder:
            raise Unavailable("no stage manager replica leads right now", code="no_leader", retry_after=1)
        channel = self._channels.get(leader.address)
        if channel is None:
            channel = self._channels[leader.address] = grpc.aio.insecure_channel(leader.address)
        stub = stagemanager_pb2_grpc.StageManagerStub(channel)
        call = getattr(stub, method)(request, timeout=context.time_remaining() or _DEFAULT_TIMEOUT_SECONDS)
        try:
            response = await call
        except grpc.aio.AioRpcError as error:
            await context.abort(error.code(), error.details() or "", error.trailing_metadata() or ())
        # Read-your-writes through any replica: answer once this copy holds what the leader did.
        revision = _revision(await call.trailing_metadata())
        if revision and not await self._inventory.wait_for(revision, _CATCH_UP_SECONDS):
            raise Unavailable(
                "this replica is behind the leader; try again", code="replica_behind", retry_after=1
            )
        return response

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
