"""The Allocator gRPC API: decode, call the allocator core, encode."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from protos.fanout.v1 import allocator_pb2, allocator_pb2_grpc, common_pb2
from services.allocator.allocation import (
    OVERFLOW,
    REALTIME,
    Allocator,
    StageViewersObservation,
    ViewerPlacement,
)
from services.allocator.tokens import IssuedToken
from services.common.grpc_server import GrpcServerMetrics, RequestFailure, answer_each

SERVICE_NAME = allocator_pb2.DESCRIPTOR.services_by_name["Allocator"].full_name
# Viewers one AssignViewers stream places at once; past it the stream reads no further request
# until one is answered (HTTP/2 flow control then holds the sender back).
MAX_CONCURRENT_ASSIGNMENTS = 256
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def token_to_proto(token: IssuedToken) -> common_pb2.ParticipantToken:
    # Built directly, exact to the microsecond: Timestamp.FromDatetime cost 2.1 µs a token, this 0.6.
    since_epoch = token.expires_at - _EPOCH
    return common_pb2.ParticipantToken(
        stage_arn=token.stage_arn,
        token=token.token,
        participant_id=token.participant_id,
        expiration_time=Timestamp(
            seconds=since_epoch.days * 86_400 + since_epoch.seconds, nanos=since_epoch.microseconds * 1000
        ),
    )


_TIERS = {REALTIME: allocator_pb2.VIEWER_TIER_REALTIME, OVERFLOW: allocator_pb2.VIEWER_TIER_OVERFLOW}


def placement_to_proto(placement: ViewerPlacement) -> allocator_pb2.AssignViewerResponse:
    return allocator_pb2.AssignViewerResponse(
        room=placement.room,
        user_id=placement.user_id,
        token=token_to_proto(placement.token) if placement.token is not None else None,
        lease_seconds=placement.lease_seconds,
        sticky=placement.sticky,
        tier=_TIERS[placement.tier],
        playback_url=placement.playback_url,
    )


def failure_to_proto(
    request: allocator_pb2.IdentifiedAssignViewerRequest, failure: RequestFailure
) -> allocator_pb2.AssignViewerResult:
    return allocator_pb2.AssignViewerResult(
        id=request.id,
        error=allocator_pb2.RequestError(
            status_code=failure.status.value[0],
            message=failure.message,
            error_code=failure.error_code,
            retry_after_seconds=failure.retry_after,
        ),
    )


class AllocatorServicer(allocator_pb2_grpc.AllocatorServicer):
    def __init__(
        self,
        allocator: Allocator,
        metrics: GrpcServerMetrics | None = None,
        stopping: asyncio.Event | None = None,
    ) -> None:
        self._allocator = allocator
        self._metrics = metrics
        # Set when the server begins to stop: AssignViewers streams then read no further request and
        # end once those read are answered, so the gateway sends the rest to another allocator.
        self._stopping = stopping

    async def AssignViewer(
        self, request: allocator_pb2.AssignViewerRequest, context: grpc.aio.ServicerContext
    ) -> allocator_pb2.AssignViewerResponse:
        placement = await self._allocator.assign_viewer(request.room, request.user_id)
        return placement_to_proto(placement)

    async def AssignViewers(
        self,
        request_iterator: AsyncIterator[allocator_pb2.AssignViewersRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[allocator_pb2.AssignViewersResponse]:
        batches = (message.requests async for message in request_iterator)
        async for results in answer_each(
            batches,
            self._assign_one,
            failure_to_proto,
            limit=MAX_CONCURRENT_ASSIGNMENTS,
            metrics=self._metrics,
            service=SERVICE_NAME,
            # Counted as the unary calls they replace, so a dashboard sees every assignment either way.
            method="AssignViewer",
            stopping=self._stopping,
        ):
            yield allocator_pb2.AssignViewersResponse(results=results)

    async def _assign_one(
        self, request: allocator_pb2.IdentifiedAssignViewerRequest
    ) -> allocator_pb2.AssignViewerResult:
        placement = await self._allocator.assign_viewer(request.request.room, request.request.user_id)
        return allocator_pb2.AssignViewerResult(id=request.id, response=placement_to_proto(placement))

    async def RenewViewer(
        self, request: allocator_pb2.RenewViewerRequest, context: grpc.aio.ServicerContext
    ) -> allocator_pb2.RenewViewerResponse:
        renewed = await self._allocator.renew_viewer(request.room, request.user_id)
        return allocator_pb2.RenewViewerResponse(
            lease_seconds=renewed.lease_seconds,
            stage_arn=renewed.stage_arn,
            tier=_TIERS[renewed.tier],
            realtime_available=renewed.realtime_available,
        )

    async def ReleaseViewer(
        self, request: allocator_pb2.ReleaseViewerRequest, context: grpc.aio.ServicerContext
    ) -> allocator_pb2.ReleaseViewerResponse:
        released = await self._allocator.release_viewer(request.room, request.user_id)
        return allocator_pb2.ReleaseViewerResponse(released=released)

    async def IssuePublisherTokens(
        self, request: allocator_pb2.IssuePublisherTokensRequest, context: grpc.aio.ServicerContext
    ) -> allocator_pb2.IssuePublisherTokensResponse:
        issued = await self._allocator.issue_publisher_tokens(
            request.room, request.user_id, request.min_revision, list(request.stage_arns)
        )
        return allocator_pb2.IssuePublisherTokensResponse(
            room=request.room,
            tokens=[
                allocator_pb2.PublisherToken(
                    token=token_to_proto(token), state=common_pb2.StageState.Value(f"STAGE_STATE_{state}")
                )
                for token, state in issued
            ],
        )

    async def GetOccupancy(
        self, request: allocator_pb2.GetOccupancyRequest, context: grpc.aio.ServicerContext
    ) -> allocator_pb2.GetOccupancyResponse:
        occupancy = await self._allocator.occupancy(request.room)
        return allocator_pb2.GetOccupancyResponse(
            rooms=[
                allocator_pb2.RoomOccupancy(
                    room=r.room,
                    viewers=r.viewers,
                    joins_total=r.joins_total,
                    overflow_viewers=r.overflow_viewers,
                    ceiling=allocator_pb2.RoomCeiling(
                        viewers=r.ceiling.viewers,
                        stages=r.ceiling.stages,
                        binding_limit=r.ceiling.binding.value,
                        description=r.ceiling.describe(),
                    ),
                )
                for r in occupancy.rooms
            ],
            stages=[
                allocator_pb2.StageOccupancy(
                    room=s.room,
                    stage_arn=s.stage_arn,
                    leased=s.leased,
                    observed=s.observed,
                    viewers=s.viewers,
                    capacity=s.capacity,
                )
                for s in occupancy.stages
            ],
            region=allocator_pb2.RegionOccupancy(
                subscriptions=occupancy.region_subscriptions,
                subscription_quota=self._allocator.settings.region_subscription_quota,
                stage_hard_limit=self._allocator.settings.hard_limit,
            ),
        )

    async def ReportObservedViewers(
        self, request: allocator_pb2.ReportObservedViewersRequest, context: grpc.aio.ServicerContext
    ) -> allocator_pb2.ReportObservedViewersResponse:
        self._allocator.record_observations(
            [
                StageViewersObservation(
                    room=o.room,
                    stage_arn=o.stage_arn,
                    subscribers=o.subscribers,
                    observed_at=o.observed_at.ToNanoseconds() / 1e9,
                )
                for o in request.observations
            ]
        )
        return allocator_pb2.ReportObservedViewersResponse()
