"""REST handlers, one per endpoint: validate the request, call the services, shape the JSON."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import validation
from gateway.admission import PUBLISHER, VIEWER
from gateway.appkeys import ADMISSION, CLIENTS, METRICS, SETTINGS
from gateway.errors import BodyTimeout, MalformedBody, UpstreamError, calling
from gateway.responses import json_response
from gateway.shapes import overflow_json, participant_token_json, stage_json, state_name
from protos.fanout.v1 import allocator_pb2, stagemanager_pb2

log = logging.getLogger(__name__)

_REFUSALS = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: "refused",
    grpc.StatusCode.NOT_FOUND: "not_found",
}


async def publisher_tokens(request: web.Request) -> web.Response:
    """POST /api/token/publisher-all: ensure the room exists, then a publish token for each Stage."""
    settings, clients, admission = request.app[SETTINGS], request.app[CLIENTS], request.app[ADMISSION]
    ticket = await admission.publisher(request.headers.get("Authorization"))
    body = admission.admit_body(ticket, await _json_body(request), PUBLISHER)
    parsed = validation.parse_publisher_tokens(body, settings.default_room)
    async with calling("stagemanager", "EnsureRoom"):
        ensured = await clients.stagemanager.EnsureRoom(
            stagemanager_pb2.EnsureRoomRequest(room=parsed.room),
            timeout=settings.room_rpc_timeout_seconds,
        )
    async with calling("allocator", "IssuePublisherTokens"):
        issued = await clients.allocator.IssuePublisherTokens(
            allocator_pb2.IssuePublisherTokensRequest(
                room=parsed.room, user_id=parsed.user_id, min_revision=ensured.revision
            ),
            timeout=settings.rpc_timeout_seconds,
        )
    tokens = [
        {**participant_token_json(issued_token.token), "state": state_name(issued_token.state)}
        for issued_token in issued.tokens
    ]
    return json_response({"room": issued.room or parsed.room, "tokens": tokens})


async def viewer_token(request: web.Request) -> web.Response:
    """POST /api/token/viewer: a subscribe-only token on the least-loaded Stage, with a lease."""
    started = time.perf_counter()
    settings, clients, metrics = request.app[SETTINGS], request.app[CLIENTS], request.app[METRICS]
    admission = request.app[ADMISSION]
    ticket = await admission.viewer(request.headers.get("Authorization"))
    body = admission.admit_body(ticket, await _json_body(request), VIEWER)
    parsed = validation.parse_viewer_token(body, settings.default_room)
    try:
        async with calling("allocator", "AssignViewer"):
            assigned = await clients.viewer_assignments.assign_viewer(
                allocator_pb2.AssignViewerRequest(room=parsed.room, user_id=parsed.user_id)
            )
    except UpstreamError as exc:
        metrics.viewer_assignments.labels(_REFUSALS.get(exc.error.code(), "error")).inc()
        raise
    room, user_id = assigned.room or parsed.room, assigned.user_id or parsed.user_id
    if assigned.tier == allocator_pb2.VIEWER_TIER_OVERFLOW:
        # Past the real-time ceiling (DESIGN.md §5): the room's low-latency channel, no Stage token.
        metrics.viewer_assignments.labels("overflow").inc()
        body = {
            "room": room,
            "userId": user_id,
            "tier": "overflow",
            "playbackUrl": assigned.playback_url,
            "leaseSeconds": assigned.lease_seconds,
        }
    else:
        metrics.viewer_assignments.labels("sticky" if assigned.sticky else "placed").inc()
        body = {
            "room": room,
            "userId": user_id,
            "tier": "realtime",
            **participant_token_json(assigned.token),
            "leaseSeconds": assigned.lease_seconds,
        }
    response = json_response(body)
    metrics.token_issue_duration.observe(time.perf_counter() - started)
    return response


async def viewer_heartbeat(request: web.Request) -> web.Response:
    """POST /api/viewer/heartbeat: extends a live lease; 404 lease_not_found when there is none."""
    settings, clients = request.app[SETTINGS], request.app[CLIENTS]
    parsed = validation.parse_viewer_lease(await _json_body(request))
    async with calling("allocator", "RenewViewer"):
        renewed = await clients.allocator.RenewViewer(
            allocator_pb2.RenewViewerRequest(room=parsed.room, user_id=parsed.user_id),
            timeout=settings.rpc_timeout_seconds,
        )
    overflow = renewed.tier == allocator_pb2.VIEWER_TIER_OVERFLOW
    answer: dict[str, Any] = {
        "leaseSeconds": renewed.lease_seconds,
        "stageArn": renewed.stage_arn or None,
        "tier": "overflow" if overflow else "realtime",
    }
    if overflow:
        # A Stage seat is free: asking for a token again takes the viewer back to real time.
        answer["realtimeAvailable"] = renewed.realtime_available
    return json_response(answer)


async def viewer_leave(request: web.Request) -> web.Response:
    """POST /api/viewer/leave: ends a lease; idempotent, and accepts navigator.sendBeacon bodies."""
    settings, clients = request.app[SETTINGS], request.app[CLIENTS]
    # sendBeacon with a string body is sent as text/plain; the page uses a JSON Blob, others may not.
    parsed = validation.parse_viewer_lease(await _json_body(request, allow_text_plain=True))
    try:
        async with calling("allocator", "ReleaseViewer"):
            await clients.allocator.ReleaseViewer(
                allocator_pb2.ReleaseViewerRequest(room=parsed.room, user_id=parsed.user_id),
                timeout=settings.rpc_timeout_seconds,
            )
    except UpstreamError as exc:
        # Leaving something that is already gone (lease or whole room) is the outcome the caller wants.
        if exc.error.code() != grpc.StatusCode.NOT_FOUND:
            raise
    return web.Response(status=204)


async def publisher_status(request: web.Request) -> web.Response:
    """POST /api/rooms/{room}/publisher/status: the broadcast page publishes (or stopped) on a Stage."""
    settings, clients, admission = request.app[SETTINGS], request.app[CLIENTS], request.app[ADMISSION]
    ticket = await admission.publisher(request.headers.get("Authorization"))
    room = validation.parse_room(request.match_info["room"])
    admission.require(ticket, room=room, role=PUBLISHER)
    parsed = validation.parse_publisher_status(room, await _json_body(request))
    async with calling("stagemanager", "ReportPublisherStatus"):
        await clients.stagemanager.ReportPublisherStatus(
            stagemanager_pb2.ReportPublisherStatusRequest(
                room=parsed.room,
                stage_arn=parsed.stage_arn,
                publishing=parsed.publishing,
                participant_id=parsed.participant_id,
            ),
            timeout=settings.rpc_timeout_seconds,
        )
    return web.Response(status=204)


async def get_room(request: web.Request) -> web.Response:
    """GET /api/rooms/{room}: the room's Stages in index order with their viewers and capacity."""
    settings, clients = request.app[SETTINGS], request.app[CLIENTS]
    room = validation.parse_room(request.match_info["room"])

    async def fetch_room() -> stagemanager_pb2.GetRoomResponse:
        async with calling("stagemanager", "GetRoom"):
            return await clients.stagemanager.GetRoom(
                stagemanager_pb2.GetRoomRequest(room=room), timeout=settings.rpc_timeout_seconds
            )

    async def fetch_occupancy() -> allocator_pb2.GetOccupancyResponse:
        async with calling("allocator", "GetOccupancy"):
            return await clients.allocator.GetOccupancy(
                allocator_pb2.GetOccupancyRequest(room=room), timeout=settings.rpc_timeout_seconds
            )

    # Both calls always finish (return_exceptions), so no failure is left unretrieved; the room's
    # own error (e.g. room_not_found) wins over the occupancy's.
    room_result, occupancy_result = await asyncio.gather(
        fetch_room(), fetch_occupancy(), return_exceptions=True
    )
    if isinstance(room_result, BaseException):
        raise room_result
    if isinstance(occupancy_result, BaseException):
        raise occupancy_result
    occupancy = {entry.stage_arn: entry for entry in occupancy_result.stages if entry.room in ("", room)}
    summary = next((r for r in occupancy_result.rooms if r.room == room), None)
    ceiling = summary.ceiling if summary is not None else None
    realtime = sum(entry.viewers for entry in occupancy.values())
    overflow_viewers = summary.overflow_viewers if summary is not None else 0
    stages = [
        stage_json(stage, occupancy.get(stage.arn) if stage.arn else None)
        for stage in sorted(room_result.room.stages, key=lambda stage: stage.index)
    ]
    return json_response(
        {
            "room": room_result.room.room or room,
            "viewers": realtime + overflow_viewers,
            "viewersByTier": {"realtime": realtime, "overflow": overflow_viewers},
            "stages": stages,
            "origins": sum(1 for stage in stages if stage["role"] == "origin"),
            "replicas": sum(1 for stage in stages if stage["role"] == "replica"),
            "publishing": room_result.room.publishing,
            "lastError": room_result.room.last_error or None,
            # The overflow tier (DESIGN.md §5): a low-latency channel composed from an origin.
            "overflow": overflow_json(room_result.room),
            # The capacity plan: this room's ceiling and the limit that sets it, and the limits every
            # room shares (how close the region is to turning viewers away).
            "capacity": {
                "ceiling": ceiling.viewers if ceiling else None,
                "ceilingStages": ceiling.stages if ceiling else None,
                "bindingLimit": ceiling.binding_limit if ceiling else None,
                "bindingLimitDescription": ceiling.description if ceiling else None,
                "regionSubscriptions": occupancy_result.region.subscriptions,
                "regionSubscriptionQuota": occupancy_result.region.subscription_quota,
                "stageHardLimit": occupancy_result.region.stage_hard_limit,
            },
        }
    )


async def end_room(request: web.Request) -> web.Response:
    """DELETE /api/rooms/{room}: drains and deletes every Stage of the room."""
    settings, clients, admission = request.app[SETTINGS], request.app[CLIENTS], request.app[ADMISSION]
    ticket = await admission.publisher(request.headers.get("Authorization"))
    room = validation.parse_room(request.match_info["room"])
    admission.require(ticket, room=room, role=PUBLISHER)
    async with calling("stagemanager", "EndRoom"):
        await clients.stagemanager.EndRoom(
            stagemanager_pb2.EndRoomRequest(room=room), timeout=settings.room_rpc_timeout_seconds
        )
    return web.Response(status=204)


async def page_config(request: web.Request) -> web.Response:
    """GET /api/config: what the pages need to know about this deployment."""
    settings = request.app[SETTINGS]
    return json_response(
        {
            "mode": settings.mode,
            "defaultRoom": settings.default_room,
            "heartbeatSeconds": settings.heartbeat_seconds,
            "leaseSeconds": settings.viewer_lease_seconds,
        }
    )


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: the process answers; dependencies are /readyz's business."""
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz: 200 when both services report SERVING on the standard gRPC health check."""
    settings, clients = request.app[SETTINGS], request.app[CLIENTS]
    limit = settings.readiness_timeout_seconds
    allocator, stagemanager = await asyncio.gather(
        _health_status(clients.allocator_health, limit), _health_status(clients.stagemanager_health, limit)
    )
    dependencies = {"allocator": allocator, "stagemanager": stagemanager}
    down = [name for name, status in dependencies.items() if status != "SERVING"]
    if not down:
        return json_response({"status": "ready", "dependencies": dependencies})
    message = "Not ready: " + ", ".join(f"{name} is {dependencies[name]}" for name in down) + "."
    return json_response(
        {"error": {"code": "not_ready", "message": message}, "dependencies": dependencies}, status=503
    )


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text exposition of this gateway's registry."""
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _health_status(stub: Any, limit_seconds: float) -> str:
    try:
        answer = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=limit_seconds)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))


async def _json_body(request: web.Request, *, allow_text_plain: bool = False) -> dict[str, Any]:
    # The whole body within the limit, not per chunk: a client dripping a byte a second would
    # otherwise hold the connection and this handler for as long as it likes.
    seconds = request.app[SETTINGS].http_body_timeout_seconds
    try:
        async with asyncio.timeout(seconds):
            # read() enforces client_max_size, so a body without Content-Length cannot exceed the limit.
            body = await request.read()
    except TimeoutError:
        raise BodyTimeout(seconds) from None
    except web.RequestPayloadError:
        # aiohttp decodes Content-Encoding and chunked framing while reading; garbage there is the
        # client's mistake, not ours.
        raise MalformedBody() from None
    return validation.parse_json_object(
        body, request.headers.get("Content-Type"), allow_text_plain=allow_text_plain
    )
