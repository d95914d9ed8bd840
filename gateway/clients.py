"""The gRPC stubs the gateway talks through, built from channels the caller owns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import grpc
from grpc_health.v1 import health_pb2_grpc

from gateway.assign_stream import AssignStream
from protos.fanout.v1 import allocator_pb2_grpc, stagemanager_pb2_grpc


@dataclass(frozen=True)
class GatewayClients:
    allocator: allocator_pb2_grpc.AllocatorAsyncStub
    stagemanager: stagemanager_pb2_grpc.StageManagerAsyncStub
    # Standard grpc.health.v1 stubs, one per dependency, for /readyz.
    allocator_health: health_pb2_grpc.HealthStub
    stagemanager_health: health_pb2_grpc.HealthStub
    # AssignViewer, a viewer's token: over one long-lived stream rather than a call per token.
    viewer_assignments: AssignStream

    @classmethod
    def from_channels(
        cls,
        allocator_channel: grpc.aio.Channel,
        stagemanager_channel: grpc.aio.Channel,
        rpc_timeout_seconds: float,
    ) -> GatewayClients:
        # The generated stubs pick their async flavour from the channel type, which mypy cannot see.
        allocator = cast(
            "allocator_pb2_grpc.AllocatorAsyncStub", allocator_pb2_grpc.AllocatorStub(allocator_channel)
        )
        return cls(
            allocator=allocator,
            stagemanager=cast(
                "stagemanager_pb2_grpc.StageManagerAsyncStub",
                stagemanager_pb2_grpc.StageManagerStub(stagemanager_channel),
            ),
            allocator_health=health_pb2_grpc.HealthStub(allocator_channel),
            stagemanager_health=health_pb2_grpc.HealthStub(stagemanager_channel),
            viewer_assignments=AssignStream(allocator, rpc_timeout_seconds),
        )
