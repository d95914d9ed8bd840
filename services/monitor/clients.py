"""gRPC senders for observations: Allocator.ReportObservedViewers and StageManager.ReportObservations."""

from __future__ import annotations

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from protos.fanout.v1 import (
    allocator_pb2,
    allocator_pb2_grpc,
    common_pb2,
    stagemanager_pb2,
    stagemanager_pb2_grpc,
)
from services.monitor.observations import Observation, ReportRejected, Send


def to_proto(observation: Observation) -> common_pb2.StageObservation:
    observed_at = Timestamp()
    observed_at.FromNanoseconds(int(observation.observed_at * 1e9))
    return common_pb2.StageObservation(
        room=observation.room,
        stage_arn=observation.stage_arn,
        session_id=observation.session_id,
        publishers=observation.publishers,
        subscribers=observation.subscribers,
        observed_at=observed_at,
    )


def _rejected(error: grpc.aio.AioRpcError) -> bool:
    return error.code() == grpc.StatusCode.INVALID_ARGUMENT


def allocator_sender(channel: grpc.aio.Channel, timeout: float) -> Send:
    stub = allocator_pb2_grpc.AllocatorStub(channel)

    async def send(observations: list[Observation]) -> None:
        request = allocator_pb2.ReportObservedViewersRequest(observations=[to_proto(o) for o in observations])
        try:
            await stub.ReportObservedViewers(request, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            if _rejected(error):
                raise ReportRejected(error.details() or "invalid argument") from error
            raise

    return send


def stagemanager_sender(channel: grpc.aio.Channel, timeout: float) -> Send:
    stub = stagemanager_pb2_grpc.StageManagerStub(channel)

    async def send(observations: list[Observation]) -> None:
        request = stagemanager_pb2.ReportObservationsRequest(observations=[to_proto(o) for o in observations])
        try:
            await stub.ReportObservations(request, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            if _rejected(error):
                raise ReportRejected(error.details() or "invalid argument") from error
            raise

    return send
