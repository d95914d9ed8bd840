"""The Stage `events` WebSocket: participants join with their token, publish, and relay WebRTC signalling.

Every frame is one JSON object with a "type". INFO below is a participant as the web SDK shows it:
``{"id", "userId", "attributes", "capabilities": {"allow_publish", "allow_subscribe"}, "isPublishing"}``.

Client -> emulator
  ``join {token}``                     the first frame, within JOIN_TIMEOUT_SECONDS
  ``publish`` / ``unpublish``          needs allow_publish; answered by publish-state
  ``subscribe {to, id, audio, video}``  needs allow_subscribe; relayed to the publisher `to`
  ``unsubscribe {to, id}``             relayed
  ``offer | answer {to, id, sdp}``     relayed; `id` names the subscription
  ``candidate {to, id, candidate}``    relayed; candidate null ends the candidates
  ``leave``                            leave the Stage (user-initiated); the socket then closes

Emulator -> client
  ``joined {participant: INFO, participants: [INFO]}``   the join worked; the others CONNECTED now
  ``participant-joined {participant: INFO}``
  ``participant-left {participantId, reason}``
  ``publish-state {participantId, publishing}``         to every participant, the publisher included
  ``subscribe | unsubscribe | offer | answer | candidate`` as sent, with ``from`` in place of ``to``
  ``error {code, name, message, [to, id]}``              a refused request; codes are StageErrorCode
  ``stage-left {reason}``                                then close 4100; reason is a StageLeftReason:
                                                         token-reused, participant-disconnected, stage-deleted

A refused join gets an ``error`` frame and the socket closes with code 4000 + the StageErrorCode (e.g. 4002
TOKEN_EXPIRED, 4006 STAGE_AT_CAPACITY). Signalling only ever reaches participants of the sender's Stage, with
one exception: a replica (StartParticipantReplication) has no socket of its own, so signalling addressed to
it goes to its source publisher's socket, whose answers find their way back; the publisher is told
``unsubscribe`` when such a subscriber leaves or the replication stops. Real media so flows from the
broadcaster's page to the replica Stage's viewers with no media server, as IVS replicates server-side.

A second exception is the emulator's own composition (services.ivslocal.composer): a StageTap is an
in-process subscriber with no socket and no participant. It hears the Stage's participant frames, sends
``subscribe``/``answer``/``candidate``/``unsubscribe`` under its own id and receives what publishers address
to that id, so the publisher's page serves it like any subscriber; ListParticipants never shows it, as
IVS does not list its compositions. Closing it tells the publishers ``unsubscribe`` for what it still holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from services.ivslocal.errors import (
    IvsApiError,
    JoinError,
    JoinTimeoutError,
    TokenMalformedError,
    TokenNotAllowedError,
)
from services.ivslocal.model import IvsState, Participant, ParticipantChange

log = logging.getLogger(__name__)

JOIN_TIMEOUT_SECONDS = 10.0
HEARTBEAT_SECONDS = 15.0
MAX_FRAME_BYTES = 256 * 1024
CLOSE_JOIN_REFUSED_BASE = 4000
CLOSE_STAGE_LEFT = 4100

# Signalling frames relayed between two participants of one Stage.
RELAYED = frozenset({"subscribe", "unsubscribe", "offer", "answer", "candidate"})
# The SDK's codes for errors that are not join refusals (StageErrorCode).
FAILED = (4, "FAILED")


def participant_info(participant: Participant) -> dict[str, Any]:
    """A participant as the SDK's StageParticipantInfo shows it to the others."""
    return {
        "id": participant.participant_id,
        "userId": participant.user_id or "",
        "attributes": dict(participant.attributes),
        "capabilities": {
            "allow_publish": participant.capabilities.publish,
            "allow_subscribe": participant.capabilities.subscribe,
        },
        "isPublishing": participant.publishing,
    }


def error_frame(code: int, name: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"type": "error", "code": code, "name": name, "message": message, **extra}


@dataclass(eq=False)
class _Close:
    code: int
    reason: str


@dataclass(eq=False)
class _ReplicaRoute:
    """A subscriber on a replica's Stage that reaches the source publisher's socket."""

    subscriber: Connection
    subscriptions: set[str] = field(default_factory=set)


@dataclass(eq=False)
class StageTap:
    """An in-process subscriber on one Stage that is no participant; made by StageSockets.attach."""

    sockets: StageSockets
    stage_arn: str
    tap_id: str
    # Called with every frame for this subscriber, on the event loop; it must not block.
    deliver: Callable[[dict[str, Any]], None]
    # subscription id -> publisher id, so a closing tap can tell its publishers.
    subscriptions: dict[str, str] = field(default_factory=dict)

    def send(self, frame: dict[str, Any]) -> None:
        """A signalling frame ({type, to, id, ...}) to a participant of the Stage."""
        self.sockets.relay_from_tap(self, frame)

    def close(self) -> None:
        self.sockets.detach(self)


@dataclass(eq=False)
class Connection:
    """One joined participant's socket; frames go out in order through `outbox`."""

    ws: web.WebSocketResponse
    participant: Participant
    outbox: asyncio.Queue[dict[str, Any] | _Close] = field(default_factory=asyncio.Queue)
    # Set when the emulator ended this participation (kick, leave): closing must not disconnect again.
    ended: bool = False

    @property
    def stage_arn(self) -> str:
        return self.participant.stage_arn

    @property
    def participant_id(self) -> str:
        return self.participant.participant_id

    def send(self, frame: dict[str, Any]) -> None:
        self.outbox.put_nowait(frame)

    def end(self, code: int, reason: str) -> None:
        self.ended = True
        self.outbox.put_nowait(_Close(code, reason))

    async def write_loop(self) -> None:
        while True:
            item = await self.outbox.get()
            if isinstance(item, _Close):
                await self.ws.close(code=item.code, message=item.reason.encode())
                return
            if self.ws.closed:
                return
            try:
                await self.ws.send_str(json.dumps(item))
            except ConnectionError:
                return


class StageSockets:
    """Who is connected to which Stage, and what the model's participant changes mean for their sockets."""

    def __init__(self, state: IvsState) -> None:
        self._state = state
        self._stages: dict[str, dict[str, Connection]] = {}
        # (source Stage ARN, publisher id) -> subscriber id -> route, for subscribers of its replicas.
        self._routes: dict[tuple[str, str], dict[str, _ReplicaRoute]] = {}
        # Stage ARN -> tap id -> the emulator's in-process subscribers on it.
        self._taps: dict[str, dict[str, StageTap]] = {}
        self._remove_listener = state.add_listener(self._on_change)

    def close(self) -> None:
        """Stops listening and closes every socket (the emulator is shutting down)."""
        self._remove_listener()
        for connections in self._stages.values():
            for connection in connections.values():
                connection.end(WSCloseCode.GOING_AWAY, "emulator shutting down")
        self._stages.clear()
        self._routes.clear()
        self._taps.clear()

    # --- joining and leaving -------------------------------------------------------------------

    def join(self, ws: web.WebSocketResponse, token: str) -> Connection:
        """Connects the token's participant (raising JoinError like IVS) and registers its socket."""
        participant = self._state.connect_participant(token)
        connection = Connection(ws, participant)
        self._stages.setdefault(participant.stage_arn, {})[participant.participant_id] = connection
        others = [
            participant_info(p)
            for p in self._state.connected_participants(participant.stage_arn)
            if p.participant_id != participant.participant_id
        ]
        connection.send(
            {"type": "joined", "participant": participant_info(participant), "participants": others}
        )
        log.info(
            "participant %s joined %s over the events socket",
            participant.participant_id,
            participant.stage_arn,
        )
        return connection

    def drop(self, connection: Connection, reason: str) -> None:
        """The socket closed. Unless the emulator already ended it, the participant is DISCONNECTED now."""
        self._unregister(connection)
        if connection.ended:
            return
        connection.ended = True
        with contextlib.suppress(IvsApiError):  # the Stage may be gone already
            self._state.disconnect(connection.stage_arn, connection.participant_id, reason=reason)

    def _unregister(self, connection: Connection) -> None:
        connections = self._stages.get(connection.stage_arn, {})
        if connections.get(connection.participant_id) is connection:
            del connections[connection.participant_id]
            if not connections:
                del self._stages[connection.stage_arn]
            # A publisher gone takes its replicas' routes along (a newer socket of its id keeps them).
            self._routes.pop((connection.stage_arn, connection.participant_id), None)
            # And the taps' subscriptions to it: its page has dropped them.
            for tap in self._taps.get(connection.stage_arn, {}).values():
                for subscription, publisher_id in list(tap.subscriptions.items()):
                    if publisher_id == connection.participant_id:
                        del tap.subscriptions[subscription]
        # A subscriber gone ends its subscriptions through replicas.
        for publisher_key in list(self._routes):
            self._end_routes(publisher_key, lambda route: route.subscriber is connection)

    # --- in-process subscribers ------------------------------------------------------------------

    def attach(self, stage_arn: str, tap_id: str, deliver: Callable[[dict[str, Any]], None]) -> StageTap:
        """Puts an in-process subscriber on the Stage; it is told `joined` with who is connected now.

        Raises ResourceNotFoundError when the Stage does not exist.
        """
        participants = [participant_info(p) for p in self._state.connected_participants(stage_arn)]
        tap = StageTap(self, stage_arn, tap_id, deliver)
        self._taps.setdefault(stage_arn, {})[tap_id] = tap
        me = {
            "id": tap_id,
            "userId": "",
            "attributes": {},
            "capabilities": {"allow_publish": False, "allow_subscribe": True},
            "isPublishing": False,
        }
        deliver({"type": "joined", "participant": me, "participants": participants})
        return tap

    def detach(self, tap: StageTap) -> None:
        """Takes the subscriber off its Stage; its publishers hear `unsubscribe` for what it still held."""
        taps = self._taps.get(tap.stage_arn, {})
        if taps.get(tap.tap_id) is not tap:
            return
        del taps[tap.tap_id]
        if not taps:
            del self._taps[tap.stage_arn]
        connections = self._stages.get(tap.stage_arn, {})
        for subscription, publisher_id in sorted(tap.subscriptions.items()):
            publisher = connections.get(publisher_id)
            if publisher is not None:
                publisher.send({"type": "unsubscribe", "from": tap.tap_id, "id": subscription})
        tap.subscriptions.clear()

    def relay_from_tap(self, tap: StageTap, frame: dict[str, Any]) -> None:
        """Relays the tap's signalling like a participant's; an absent target is an `error` to the tap."""
        kind, target_id, subscription = frame.get("type"), frame.get("to"), frame.get("id")
        if self._taps.get(tap.stage_arn, {}).get(tap.tap_id) is not tap or kind not in RELAYED:
            return
        target = self._stages.get(tap.stage_arn, {}).get(target_id) if isinstance(target_id, str) else None
        if target is None:
            tap.deliver(
                error_frame(
                    *FAILED, f"participant {target_id!r} is not on this Stage", to=target_id, id=subscription
                )
            )
            return
        if isinstance(subscription, str) and isinstance(target_id, str):
            if kind == "subscribe":
                tap.subscriptions[subscription] = target_id
            elif kind == "unsubscribe":
                tap.subscriptions.pop(subscription, None)
        relayed = {k: v for k, v in frame.items() if k != "to"}
        relayed["from"] = tap.tap_id
        target.send(relayed)

    def _tell_taps(self, stage_arn: str, frame: dict[str, Any]) -> None:
        for tap in list(self._taps.get(stage_arn, {}).values()):
            tap.deliver(frame)

    # --- frames from a joined participant ------------------------------------------------------

    def handle(self, connection: Connection, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind in ("publish", "unpublish"):
            self._publish(connection, kind == "publish")
        elif kind in RELAYED:
            self._relay(connection, str(kind), frame)
        elif kind == "leave":
            self._unregister(connection)
            connection.end(WSCloseCode.OK, "user-initiated")
            with contextlib.suppress(IvsApiError):
                self._state.disconnect(
                    connection.stage_arn, connection.participant_id, reason="user-initiated"
                )
        else:
            connection.send(error_frame(*FAILED, f"unknown frame type {kind!r}"))

    def _publish(self, connection: Connection, publishing: bool) -> None:
        participant = connection.participant
        if publishing and not participant.capabilities.publish:
            error = TokenNotAllowedError("the token does not allow publishing")
            connection.send(error_frame(error.sdk_code, error.name, error.message))
            return
        unchanged = participant.publishing == publishing
        self._state.set_published(connection.stage_arn, connection.participant_id, publishing)
        if unchanged:
            # No change, so no broadcast; the sender still wants its answer.
            connection.send(
                {
                    "type": "publish-state",
                    "participantId": participant.participant_id,
                    "publishing": publishing,
                }
            )

    def _relay(self, sender: Connection, kind: str, frame: dict[str, Any]) -> None:
        target_id = frame.get("to")
        subscription = frame.get("id")
        if kind == "subscribe" and not sender.participant.capabilities.subscribe:
            error = TokenNotAllowedError("the token does not allow subscribing")
            sender.send(error_frame(error.sdk_code, error.name, error.message, to=target_id, id=subscription))
            return
        target = self._stages.get(sender.stage_arn, {}).get(target_id) if isinstance(target_id, str) else None
        tap = self._taps.get(sender.stage_arn, {}).get(target_id) if isinstance(target_id, str) else None
        if target is None and tap is not None:
            tap.deliver({**{k: v for k, v in frame.items() if k != "to"}, "from": sender.participant_id})
            return
        if target is None and isinstance(target_id, str):
            target = self._across_replication(sender, kind, target_id, subscription)
        if target is None or target is sender:
            sender.send(
                error_frame(
                    *FAILED, f"participant {target_id!r} is not on this Stage", to=target_id, id=subscription
                )
            )
            return
        relayed = {k: v for k, v in frame.items() if k != "to"}
        relayed["from"] = sender.participant_id
        target.send(relayed)

    def _across_replication(
        self, sender: Connection, kind: str, target_id: str, subscription: object
    ) -> Connection | None:
        """The socket behind a participant that is not on the sender's Stage but reachable by replication."""
        replication = self._state.active_replication_into(sender.stage_arn, target_id)
        if replication is not None:
            # A subscriber of a replica: its source publisher answers.
            publisher = self._stages.get(replication.source_stage_arn, {}).get(target_id)
            if publisher is None:
                return None
            routes = self._routes.setdefault((replication.source_stage_arn, target_id), {})
            route = routes.get(sender.participant_id)
            if route is None or route.subscriber is not sender:
                route = routes[sender.participant_id] = _ReplicaRoute(sender)
            if isinstance(subscription, str):
                if kind == "subscribe":
                    route.subscriptions.add(subscription)
                elif kind == "unsubscribe":
                    route.subscriptions.discard(subscription)
            return publisher
        # A source publisher answering a subscriber of one of its replicas.
        route = self._routes.get((sender.stage_arn, sender.participant_id), {}).get(target_id)
        return route.subscriber if route is not None else None

    def _end_routes(self, publisher_key: tuple[str, str], ending: Callable[[_ReplicaRoute], bool]) -> None:
        """Drops the publisher's routes that end; the publisher hears `unsubscribe` for each subscription."""
        routes = self._routes.get(publisher_key, {})
        publisher = self._stages.get(publisher_key[0], {}).get(publisher_key[1])
        for subscriber_id, route in list(routes.items()):
            if not ending(route):
                continue
            del routes[subscriber_id]
            if publisher is not None:
                for subscription in sorted(route.subscriptions):
                    publisher.send({"type": "unsubscribe", "from": subscriber_id, "id": subscription})
        if not routes:
            self._routes.pop(publisher_key, None)

    # --- the model's changes -------------------------------------------------------------------

    def _on_change(self, change: ParticipantChange) -> None:
        participant = change.participant
        connections = self._stages.get(participant.stage_arn, {})
        if change.kind == "joined":
            previous = connections.get(participant.participant_id)
            if previous is not None:
                # One connection per token: the newer one wins, as in IVS.
                self._kick(previous, "token-reused")
                self._broadcast(
                    connections,
                    participant,
                    {
                        "type": "participant-left",
                        "participantId": participant.participant_id,
                        "reason": "token-reused",
                    },
                )
            self._broadcast(
                connections,
                participant,
                {"type": "participant-joined", "participant": participant_info(participant)},
            )
        elif change.kind == "left":
            kicked = connections.get(participant.participant_id)
            if kicked is not None:
                # Not this socket's own doing (drop and leave unregister first): DisconnectParticipant,
                # DeleteStage or anything else that ended the participation in the model.
                self._kick(kicked, change.reason or "unknown")
            self._broadcast(
                connections,
                participant,
                {
                    "type": "participant-left",
                    "participantId": participant.participant_id,
                    "reason": change.reason,
                },
            )
        elif change.kind == "replication-stopped" and change.replication is not None:
            destination = change.replication.destination_stage_arn
            self._end_routes(
                (change.replication.source_stage_arn, change.replication.participant_id),
                lambda route: route.subscriber.stage_arn == destination,
            )
        elif change.kind in ("published", "unpublished"):
            frame = {
                "type": "publish-state",
                "participantId": participant.participant_id,
                "publishing": change.kind == "published",
            }
            for connection in connections.values():
                connection.send(frame)
            self._tell_taps(participant.stage_arn, frame)

    def _kick(self, connection: Connection, reason: str) -> None:
        self._unregister(connection)
        connection.send({"type": "stage-left", "reason": reason})
        connection.end(CLOSE_STAGE_LEFT, reason)
        log.info("participant %s left %s: %s", connection.participant_id, connection.stage_arn, reason)

    def _broadcast(
        self, connections: dict[str, Connection], about: Participant, frame: dict[str, Any]
    ) -> None:
        for participant_id, connection in list(connections.items()):
            if participant_id != about.participant_id:
                connection.send(frame)
        self._tell_taps(about.stage_arn, frame)


def _parse(data: str) -> dict[str, Any] | None:
    try:
        frame = json.loads(data)
    except ValueError:
        return None
    return frame if isinstance(frame, dict) and isinstance(frame.get("type"), str) else None


async def _refuse(ws: web.WebSocketResponse, error: JoinError) -> web.WebSocketResponse:
    await ws.send_str(json.dumps(error_frame(error.sdk_code, error.name, error.message)))
    await ws.close(code=CLOSE_JOIN_REFUSED_BASE + error.sdk_code, message=error.name.encode())
    return ws


SOCKETS_KEY = web.AppKey("ivslocal_stage_sockets", StageSockets)


async def events_handler(request: web.Request) -> web.WebSocketResponse:
    """GET /events: one participant's socket for its whole stay on the Stage."""
    sockets = request.app[SOCKETS_KEY]
    ws = web.WebSocketResponse(heartbeat=HEARTBEAT_SECONDS, max_msg_size=MAX_FRAME_BYTES)
    await ws.prepare(request)
    try:
        first = await asyncio.wait_for(ws.receive(), JOIN_TIMEOUT_SECONDS)
    except TimeoutError:
        return await _refuse(ws, JoinTimeoutError("no join frame in time"))
    if first.type != WSMsgType.TEXT:
        await ws.close()
        return ws
    frame = _parse(first.data)
    token = frame.get("token") if frame and frame["type"] == "join" else None
    if not isinstance(token, str):
        return await _refuse(ws, TokenMalformedError("the first frame must be {type: join, token}"))
    try:
        connection = sockets.join(ws, token)
    except JoinError as error:
        log.info("join refused: %s %s", error.name, error.message)
        return await _refuse(ws, error)

    writer = asyncio.create_task(connection.write_loop())
    try:
        async for message in ws:
            if message.type != WSMsgType.TEXT:
                continue
            frame = _parse(message.data)
            if frame is None:
                connection.send(error_frame(*FAILED, "frames are JSON objects with a type"))
                continue
            try:
                sockets.handle(connection, frame)
            except IvsApiError as error:
                connection.send(error_frame(*FAILED, error.message))
    finally:
        sockets.drop(connection, reason="unknown")
        if not writer.done():
            connection.end(WSCloseCode.OK, "closed")
            with contextlib.suppress(TimeoutError, ConnectionError):
                await asyncio.wait_for(writer, 2)
            writer.cancel()
    return ws
