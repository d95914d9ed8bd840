"""The broadcaster's server-sent events: a snapshot of the room's Stages with publish tokens, then changes.

Events: `snapshot` {"room", "tokens": [{stageArn, token, participantId, expirationTime, state}]},
`stage-added` {one such token}, `stage-removed` {"stageArn"}, `room-ended` {"room"}, and
`unavailable` {"message"} just before the stream closes because a dependency went away (the client
reconnects and gets a fresh snapshot). Comment lines keep idle connections open through proxies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import grpc
from aiohttp import web

from gateway import validation
from gateway.admission import PUBLISHER
from gateway.appkeys import ADMISSION, CLIENTS, SETTINGS
from gateway.clients import GatewayClients
from gateway.errors import calling
from gateway.shapes import participant_token_json, state_name
from protos.fanout.v1 import allocator_pb2, common_pb2, stagemanager_pb2

log = logging.getLogger(__name__)

# Stages a broadcaster publishes to: every origin that exists in IVS, DRAINING included (its viewers
# still watch until they leave). Replicas are IVS's business (server-side replication).
_PUBLISHED_STATES = frozenset(
    {common_pb2.STAGE_STATE_STANDBY, common_pb2.STAGE_STATE_LIVE, common_pb2.STAGE_STATE_DRAINING}
)
_END = object()


class OpenStreams:
    """The handler tasks of open event streams."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()


ACTIVE_STREAMS = web.AppKey("publisher_streams", OpenStreams)


def track_streams(app: web.Application) -> None:
    """Open event streams never end by themselves: shutdown cancels them so the server can stop."""
    app[ACTIVE_STREAMS] = OpenStreams()

    async def cancel_streams(app: web.Application) -> None:
        for task in list(app[ACTIVE_STREAMS].tasks):
            task.cancel()

    app.on_shutdown.append(cancel_streams)


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class PublisherStream:
    """Turns one room's WatchRoom stream into the broadcaster's events, minting a token per new Stage."""

    def __init__(self, clients: GatewayClients, room: str, user_id: str, rpc_timeout: float) -> None:
        self._clients = clients
        self._room = room
        self._user_id = user_id
        self._timeout = rpc_timeout
        self._announced: set[str] = set()

    async def _tokens(self, revision: int, arns: list[str] | None = None) -> list[dict[str, Any]]:
        issued = await self._clients.allocator.IssuePublisherTokens(
            allocator_pb2.IssuePublisherTokensRequest(
                room=self._room, user_id=self._user_id, min_revision=revision, stage_arns=arns or []
            ),
            timeout=self._timeout,
        )
        return [{**participant_token_json(t.token), "state": state_name(t.state)} for t in issued.tokens]

    async def translate(self, event: stagemanager_pb2.RoomEvent) -> list[bytes]:
        kind = event.WhichOneof("event")
        if kind == "snapshot":
            tokens = await self._tokens(event.revision)
            self._announced = {token["stageArn"] for token in tokens}
            return [_event("snapshot", {"room": self._room, "tokens": tokens})]
        if kind in ("stage_added", "stage_changed"):
            stage = getattr(event, kind)
            if (
                stage.arn
                and stage.state in _PUBLISHED_STATES
                and stage.role != common_pb2.STAGE_ROLE_REPLICA
                and stage.arn not in self._announced
            ):
                try:
                    tokens = await self._tokens(event.revision, [stage.arn])
                except grpc.aio.AioRpcError as error:
                    if error.code() == grpc.StatusCode.NOT_FOUND:
                        return []  # gone again before its token could be made
                    raise
                self._announced.update(token["stageArn"] for token in tokens)
                return [_event("stage-added", token) for token in tokens]
            if stage.arn in self._announced and stage.state == common_pb2.STAGE_STATE_DELETING:
                self._announced.discard(stage.arn)
                return [_event("stage-removed", {"stageArn": stage.arn})]
        elif kind == "stage_removed" and event.stage_removed.arn in self._announced:
            self._announced.discard(event.stage_removed.arn)
            return [_event("stage-removed", {"stageArn": event.stage_removed.arn})]
        elif kind == "room_ended":
            return [_event("room-ended", {"room": self._room})]
        return []


async def publisher_events(request: web.Request) -> web.StreamResponse:
    """GET /api/rooms/{room}/publisher/events (publisher auth): server-sent events for the broadcaster."""
    settings, clients, admission = request.app[SETTINGS], request.app[CLIENTS], request.app[ADMISSION]
    ticket = await admission.publisher(request.headers.get("Authorization"))
    room = validation.parse_room(request.match_info["room"])
    user_id = validation.parse_user_id(request.query.get("userId", "broadcaster"))
    admission.require(ticket, room=room, role=PUBLISHER, user_id=request.query.get("userId"))
    if ticket is not None:
        user_id = ticket.subject
    # Errors up to here are ordinary JSON errors; after prepare() the stream reports them itself.
    async with calling("stagemanager", "EnsureRoom"):
        await clients.stagemanager.EnsureRoom(
            stagemanager_pb2.EnsureRoomRequest(room=room), timeout=settings.room_rpc_timeout_seconds
        )
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache, no-store",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    current = asyncio.current_task()
    streams = request.app[ACTIVE_STREAMS].tasks
    if current is not None:
        streams.add(current)
    stream = PublisherStream(clients, room, user_id, settings.rpc_timeout_seconds)
    call = clients.stagemanager.WatchRoom(stagemanager_pb2.WatchRoomRequest(room=room))
    queue: asyncio.Queue[Any] = asyncio.Queue()
    reader = asyncio.create_task(_read_into(call, queue))
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), settings.sse_keepalive_seconds)
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            if item is _END:
                await response.write(
                    _event("unavailable", {"message": "the stage manager went away; reconnect"})
                )
                break
            chunks = await stream.translate(item)
            for chunk in chunks:
                await response.write(chunk)
            if item.WhichOneof("event") == "room_ended":
                break
    except (ConnectionResetError, asyncio.CancelledError):
        pass  # the broadcaster went away
    except grpc.aio.AioRpcError as error:
        log.warning("publisher events for room %s ended: %s", room, error.code().name)
        with contextlib.suppress(ConnectionResetError):
            await response.write(_event("unavailable", {"message": "a dependency is unavailable; reconnect"}))
    finally:
        if current is not None:
            streams.discard(current)
        call.cancel()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    return response


async def _read_into(call: Any, queue: asyncio.Queue[Any]) -> None:
    try:
        async for event in call:
            await queue.put(event)
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.CANCELLED:
            log.warning("WatchRoom stream failed: %s", error.code().name)
    finally:
        await queue.put(_END)
