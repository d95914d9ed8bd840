"""Participants on the emulator's Stage `events` WebSocket, checked through the socket and boto3."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from botocore.exceptions import ClientError

from services.common import jwt_es384
from services.ivslocal.config import Settings
from tests.integration import ivslocal_fixtures
from tests.integration.ivslocal_fixtures import AsyncIvsClient, IvsLocalServer, running_ivslocal
from tests.integration.test_ivslocal_participants import api_token, imported_signer, participants, self_signed

ivslocal = ivslocal_fixtures.ivslocal

Frame = dict[str, Any]


def events_url(token: str) -> str:
    """The socket address a client reads from the token, as the SDK does (claim events_url)."""
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return str(claims["events_url"])


class Peer:
    """One participant's socket; a reader task keeps every frame so tests can wait for any of them."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.frames: list[Frame] = []
        self._arrived = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                async with self._arrived:
                    self.frames.append(json.loads(message.data))
                    self._arrived.notify_all()
        async with self._arrived:
            self._arrived.notify_all()

    async def send(self, **frame: Any) -> None:
        await self.ws.send_str(json.dumps(frame))

    async def wait_for(self, match: Callable[[Frame], bool], what: str, within: float = 5.0) -> Frame:
        async def found() -> Frame:
            async with self._arrived:
                while True:
                    hit = next((f for f in self.frames if match(f)), None)
                    if hit is not None:
                        return hit
                    if self._reader.done():
                        raise AssertionError(f"socket closed before {what}; got {self.frames}")
                    await self._arrived.wait()

        try:
            return await asyncio.wait_for(found(), within)
        except TimeoutError:
            raise AssertionError(f"no {what} within {within}s; got {self.frames}") from None

    async def frame(self, kind: str, **fields: Any) -> Frame:
        return await self.wait_for(
            lambda f: f["type"] == kind and all(f.get(k) == v for k, v in fields.items()),
            f"{kind} {fields}",
        )

    async def closed(self, within: float = 5.0) -> int | None:
        await asyncio.wait_for(asyncio.shield(self._reader), within)
        return self.ws.close_code

    def of_type(self, kind: str) -> list[Frame]:
        return [f for f in self.frames if f["type"] == kind]


@asynccontextmanager
async def sockets(server: IvsLocalServer) -> AsyncIterator[Callable[[str], Any]]:
    """`await open_socket(token)` -> a Peer that has sent its join frame; all are closed at the end.

    Every Stage's events endpoint is the same socket address; self-signed test tokens carry a dummy one.
    """
    url = server.url.replace("http://", "ws://") + "/events"
    async with aiohttp.ClientSession() as session:
        peers: list[Peer] = []

        async def open_socket(token: str) -> Peer:
            peer = Peer(await session.ws_connect(url))
            peers.append(peer)
            await peer.send(type="join", token=token)
            return peer

        try:
            yield open_socket
        finally:
            for peer in peers:
                await peer.ws.close()


async def joined(open_socket: Callable[[str], Any], token: str) -> Peer:
    peer: Peer = await open_socket(token)
    await peer.frame("joined")
    return peer


async def active_session(ivs: AsyncIvsClient, stage_arn: str) -> str:
    return str((await ivs.get_stage(arn=stage_arn))["stage"]["activeSessionId"])


async def test_a_good_token_joins_and_everyone_learns_who_is_there(ivslocal: IvsLocalServer) -> None:
    ivs = ivslocal.client()
    stage_arn = (await ivs.create_stage(name="show"))["stage"]["arn"]
    publisher = await api_token(
        ivs, stage_arn, userId="broadcaster", capabilities=["PUBLISH"], attributes={"role": "publisher"}
    )
    viewer = await api_token(ivs, stage_arn, userId="viewer-1", capabilities=["SUBSCRIBE"])
    assert events_url(publisher["token"]) == ivslocal.url.replace("http://", "ws://") + "/events"

    async with sockets(ivslocal) as open_socket:
        first = await joined(open_socket, publisher["token"])
        hello = first.of_type("joined")[0]
        assert hello["participant"] == {
            "id": publisher["participantId"],
            "userId": "broadcaster",
            "attributes": {"role": "publisher"},
            "capabilities": {"allow_publish": True, "allow_subscribe": False},
            "isPublishing": False,
        }
        assert hello["participants"] == []

        session_id = await active_session(ivs, stage_arn)
        detail = (
            await ivs.get_participant(
                stageArn=stage_arn, sessionId=session_id, participantId=publisher["participantId"]
            )
        )["participant"]
        assert detail["state"] == "CONNECTED" and detail["userId"] == "broadcaster"

        second = await joined(open_socket, viewer["token"])
        assert [p["id"] for p in second.of_type("joined")[0]["participants"]] == [publisher["participantId"]]
        told = await first.frame("participant-joined")
        assert told["participant"]["id"] == viewer["participantId"]
        assert told["participant"]["capabilities"] == {"allow_publish": False, "allow_subscribe": True}
        assert await participants(ivs, stage_arn, session_id) == {
            publisher["participantId"]: "CONNECTED",
            viewer["participantId"]: "CONNECTED",
        }


async def test_refused_joins_carry_the_sdk_error_code(ivslocal: IvsLocalServer) -> None:
    ivs = ivslocal.client()
    stage_arn = (await ivs.create_stage())["stage"]["arn"]
    other_arn = (await ivs.create_stage())["stage"]["arn"]
    key, kid = await imported_signer(ivs)
    forged = self_signed(jwt_es384.generate_private_key(), kid, stage_arn, "forged")
    expired = self_signed(key, kid, stage_arn, "late", expires_in=-5)
    wrong_stage = self_signed(key, kid, stage_arn, "mixed", topic=other_arn.rsplit("/", 1)[1])
    banned = self_signed(key, kid, other_arn, "banned")
    garbage = "not-a-token"

    async with sockets(ivslocal) as open_socket:
        await joined(open_socket, banned)
        await ivs.disconnect_participant(stageArn=other_arn, participantId="banned")

        cases = [
            (forged, 8, "TOKEN_NOT_ALLOWED"),
            (expired, 2, "TOKEN_EXPIRED"),
            (wrong_stage, 8, "TOKEN_NOT_ALLOWED"),
            (banned, 10, "PARTICIPANT_DISCONNECTED"),
        ]
        for token, code, name in cases:
            peer = await open_socket(token)
            refusal = await peer.frame("error")
            assert (refusal["code"], refusal["name"]) == (code, name)
            assert await peer.closed() == 4000 + code
            assert peer.of_type("joined") == []

        peer = await open_socket(garbage)
        refusal = await peer.frame("error")
        assert (refusal["code"], refusal["name"]) == (1, "TOKEN_MALFORMED")
        assert await peer.closed() == 4001

    # None of the refused joins started a session on the first Stage.
    assert (await ivs.list_stage_sessions(stageArn=stage_arn))["stageSessions"] == []


async def test_a_deleted_stage_refuses_joins(ivslocal: IvsLocalServer) -> None:
    ivs = ivslocal.client()
    stage_arn = (await ivs.create_stage())["stage"]["arn"]
    token = (await api_token(ivs, stage_arn))["token"]
    await ivs.delete_stage(arn=stage_arn)
    async with sockets(ivslocal) as open_socket:
        peer = await open_socket(token)
        refusal = await peer.frame("error")
        assert (refusal["code"], refusal["name"]) == (9, "STAGE_DELETED")
        assert await peer.closed() == 4009


async def test_reusing_a_token_kicks_the_first_socket(ivslocal: IvsLocalServer) -> None:
    ivs = ivslocal.client()
    stage_arn = (await ivs.create_stage())["stage"]["arn"]
    publisher = await api_token(ivs, stage_arn, capabilities=["PUBLISH"])
    viewer = await api_token(ivs, stage_arn, capabilities=["SUBSCRIBE"])
    pid = publisher["participantId"]

    async with sockets(ivslocal) as open_socket:
        watcher = await joined(open_socket, viewer["token"])
        first = await joined(open_socket, publisher["token"])
        await first.send(type="publish")
        await watcher.frame("publish-state", participantId=pid, publishing=True)

        second = await joined(open_socket, publisher["token"])
        assert (await first.frame("stage-left"))["reason"] == "token-reused"
        assert await first.closed() == 4100
        # The others see the old connection go and the new one (not publishing yet) arrive.
        await watcher.frame("publish-state", participantId=pid, publishing=False)
        left = await watcher.frame("participant-left", participantId=pid)
        assert left["reason"] == "token-reused"
        # The join comes after the leave, in the same turn of the emulator's loop.
        await watcher.wait_for(lambda f: len(watcher.of_type("participant-joined")) == 2, "the rejoin")
        later = watcher.frames[watcher.frames.index(left) + 1 :]
        rejoined = next(f for f in later if f["type"] == "participant-joined")
        assert rejoined["participant"]["isPublishing"] is False

        session_id = await active_session(ivs, stage_arn)
        assert await participants(ivs, stage_arn, session_id) == {
            viewer["participantId"]: "CONNECTED",
            pid: "CONNECTED",
        }
        # The kicked socket closing does not disconnect the participant that took over.
        await second.send(type="publish")
        await second.frame("publish-state", participantId=pid, publishing=True)
        assert (await participants(ivs, stage_arn, session_id))[pid] == "CONNECTED"


async def test_publishing_is_tracked_and_told_to_everyone(ivslocal: IvsLocalServer) -> None:
    ivs = ivslocal.client()
    stage_arn = (await ivs.create_stage())["stage"]["arn"]
    publisher = await api_token(ivs, stage_arn, capabilities=["PUBLISH"])
    viewer = await api_token(ivs, stage_arn, capabilities=["SUBSCRIBE"])
    pid, vid = publisher["participantId"], viewer["participantId"]

    async with sockets(ivslocal) as open_socket:
        pub = await joined(open_socket, publisher["token"])
        sub = await joined(open_socket, viewer["token"])
        session_id = await active_session(ivs, stage_arn)
        assert await participants(ivs, stage_arn, session_id, filterByPublished=True) == {}

        await pub.send(type="publish")
        await pub.frame("publish-state", participantId=pid, publishing=True)
        await sub.frame("publish-state", participantId=pid, publishing=True)
        assert await participants(ivs, stage_arn, session_id, filterByPublished=True) == {pid: "CONNECTED"}

        # A subscribe-only token cannot publish.
        await sub.send(type="publish")
        refusal = await sub.frame("error")
        assert (refusal["code"], refusal["name"]) == (8, "TOKEN_NOT_ALLOWED")
        assert sub.of_type("publish-state") == [
            {"type": "publish-state", "participantId": pid, "publishing": True}
        ]

        await pub.send(type="unpublish")
        await sub.frame("publish-state", participantId=pid, publishing=False)
        # "published" in ListParticipants means "has published in this session".
        assert await participants(ivs, stage_arn, session_id, filterByPublished=True) == {pid: "CONNECTED"}
        # Someone joining now sees the publisher as not publishing.
        late = await joined(
            open_socket, (await api_token(ivs, stage_arn, capabilities=["SUBSCRIBE"]))["token"]
        )
        listed = {p["id"]: p["isPublishing"] for p in late.of_type("joined")[0]["participants"]}
        assert listed == {pid: False, vid: False}


async def test_signalling_is_relayed_only_within_the_stage(ivslocal: IvsLocalServer) -> None:
    ivs = ivslocal.client()
    stage_arn = (await ivs.create_stage())["stage"]["arn"]
    other_arn = (await ivs.create_stage())["stage"]["arn"]
    publisher = await api_token(ivs, stage_arn, capabilities=["PUBLISH"])
    viewer = await api_token(ivs, stage_arn, capabilities=["SUBSCRIBE"])
    stranger = await api_token(ivs, other_arn, capabilities=["SUBSCRIBE"])
    pid, vid = publisher["participantId"], viewer["participantId"]

    async with sockets(ivslocal) as open_socket:
        pub = await joined(open_socket, publisher["token"])
        sub = await joined(open_socket, viewer["token"])
        outsider = await joined(open_socket, stranger["token"])

        await sub.send(type="subscribe", to=pid, id="s1", audio=True, video=True)
        request = await pub.frame("subscribe", id="s1")
        assert request == {"type": "subscribe", "from": vid, "id": "s1", "audio": True, "video": True}
        await pub.send(type="offer", to=vid, id="s1", sdp="v=0 offer")
        assert await sub.frame("offer") == {"type": "offer", "from": pid, "id": "s1", "sdp": "v=0 offer"}
        await sub.send(type="answer", to=pid, id="s1", sdp="v=0 answer")
        assert (await pub.frame("answer"))["sdp"] == "v=0 answer"
        candidate = {"candidate": "candidate:1 1 udp 1 127.0.0.1 5000 typ host", "sdpMid": "0"}
        await pub.send(type="candidate", to=vid, id="s1", candidate=candidate)
        assert (await sub.frame("candidate"))["candidate"] == candidate

        # A participant of another Stage cannot reach them, even knowing their ids.
        await outsider.send(type="offer", to=pid, id="x", sdp="v=0 intruder")
        refusal = await outsider.frame("error")
        assert refusal["to"] == pid and refusal["name"] == "FAILED"
        await outsider.send(type="subscribe", to=pid, id="x", audio=True, video=True)
        await outsider.wait_for(lambda f: f["type"] == "error" and f is not refusal, "a second refusal")
        # A publisher cannot subscribe (no allow_subscribe); the frame never reaches the viewer.
        await pub.send(type="subscribe", to=vid, id="p1", audio=True, video=True)
        assert (await pub.frame("error"))["name"] == "TOKEN_NOT_ALLOWED"
        # Messages sent after the refusals arrive, and nothing from the outsider came before them.
        await sub.send(type="candidate", to=pid, id="s1", candidate=None)
        await pub.frame("candidate", id="s1")
        await pub.send(type="candidate", to=vid, id="s1", candidate=None)
        await sub.wait_for(
            lambda f: f["type"] == "candidate" and f["candidate"] is None, "the last candidate"
        )
        assert all(f.get("from") in (None, vid) for f in pub.frames)
        assert all(f["type"] != "subscribe" for f in sub.frames)


async def test_disconnect_participant_and_delete_stage_kick_with_the_sdk_reasons(
    ivslocal: IvsLocalServer,
) -> None:
    ivs = ivslocal.client()
    stage_arn = (await ivs.create_stage())["stage"]["arn"]
    tokens = [await api_token(ivs, stage_arn, capabilities=["SUBSCRIBE"]) for _ in range(3)]

    async with sockets(ivslocal) as open_socket:
        peers = [await joined(open_socket, t["token"]) for t in tokens]
        kicked_id = tokens[0]["participantId"]
        await ivs.disconnect_participant(stageArn=stage_arn, participantId=kicked_id, reason="rude")
        assert (await peers[0].frame("stage-left"))["reason"] == "participant-disconnected"
        assert await peers[0].closed() == 4100
        gone = await peers[1].frame("participant-left", participantId=kicked_id)
        assert gone["reason"] == "participant-disconnected"
        session_id = await active_session(ivs, stage_arn)
        assert (await participants(ivs, stage_arn, session_id))[kicked_id] == "DISCONNECTED"

        await ivs.delete_stage(arn=stage_arn)
        for peer in peers[1:]:
            assert (await peer.frame("stage-left"))["reason"] == "stage-deleted"
            assert await peer.closed() == 4100


async def test_a_closed_socket_disconnects_and_the_last_one_out_ends_the_session(
    ivslocal: IvsLocalServer,
) -> None:
    ivs = ivslocal.client()
    stage_arn = (await ivs.create_stage())["stage"]["arn"]
    publisher = await api_token(ivs, stage_arn, capabilities=["PUBLISH"])
    viewer = await api_token(ivs, stage_arn, capabilities=["SUBSCRIBE"])
    pid, vid = publisher["participantId"], viewer["participantId"]

    async with sockets(ivslocal) as open_socket:
        pub = await joined(open_socket, publisher["token"])
        sub = await joined(open_socket, viewer["token"])
        await pub.send(type="publish")
        await sub.frame("publish-state", participantId=pid, publishing=True)
        session_id = await active_session(ivs, stage_arn)

        # Dropping the socket, without a word, is leaving: it stops publishing first.
        await pub.ws.close()
        await sub.frame("publish-state", participantId=pid, publishing=False)
        await sub.frame("participant-left", participantId=pid)
        assert await participants(ivs, stage_arn, session_id) == {pid: "DISCONNECTED", vid: "CONNECTED"}

        # A leave frame ends the participation and the server closes the socket.
        await sub.send(type="leave")
        assert await sub.closed() == 1000
        assert await participants(ivs, stage_arn, session_id) == {pid: "DISCONNECTED", vid: "DISCONNECTED"}
        stage = (await ivs.get_stage(arn=stage_arn))["stage"]
        assert "activeSessionId" not in stage
        ended = (await ivs.get_stage_session(stageArn=stage_arn, sessionId=session_id))["stageSession"]
        assert ended["endTime"] >= ended["startTime"]

        # The same token may join again (it was not DisconnectParticipant'ed): a new session starts.
        again = await joined(open_socket, viewer["token"])
        assert again.of_type("joined")[0]["participant"]["id"] == vid
        assert await active_session(ivs, stage_arn) != session_id


async def test_the_thirteenth_publisher_and_a_subscriber_over_quota_are_at_capacity() -> None:
    async with (
        running_ivslocal(Settings(port=0, subscriber_quota=1)) as server,
        sockets(server) as open_socket,
    ):
        ivs = server.client()
        stage_arn = (await ivs.create_stage())["stage"]["arn"]
        key, kid = await imported_signer(ivs)
        for index in range(12):
            await joined(open_socket, self_signed(key, kid, stage_arn, f"pub-{index}", publish=True))
        late = await open_socket(self_signed(key, kid, stage_arn, "pub-12", publish=True))
        refusal = await late.frame("error")
        assert (refusal["code"], refusal["name"]) == (6, "STAGE_AT_CAPACITY")
        assert await late.closed() == 4006

        await joined(open_socket, self_signed(key, kid, stage_arn, "sub-0"))
        over = await open_socket(self_signed(key, kid, stage_arn, "sub-1"))
        assert (await over.frame("error"))["name"] == "STAGE_AT_CAPACITY"
        session_id = await active_session(ivs, stage_arn)
        connected = await participants(ivs, stage_arn, session_id, filterByState="CONNECTED")
        assert len(connected) == 13 and "pub-12" not in connected and "sub-1" not in connected


async def test_a_socket_that_never_joins_properly_is_refused(ivslocal: IvsLocalServer) -> None:
    ivs = ivslocal.client()
    stage_arn = (await ivs.create_stage())["stage"]["arn"]
    url = events_url((await api_token(ivs, stage_arn))["token"])
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(url)
        await ws.send_str(json.dumps({"type": "publish"}))
        refusal = json.loads((await ws.receive()).data)
        assert refusal["name"] == "TOKEN_MALFORMED"
        await ws.receive()
        assert ws.close_code == 4001
    with pytest.raises(ClientError):
        await ivs.get_stage_session(stageArn=stage_arn, sessionId="st-" + "a" * 13)


async def test_a_token_offered_as_a_subprotocol_never_reaches_the_log(
    ivslocal: IvsLocalServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The real Web SDK offers its participant token as the socket's subprotocol; aiohttp logs the
    offered protocols it does not accept, which must not put the token in the log."""
    caplog.set_level(logging.DEBUG)
    ivs = ivslocal.client()
    stage_arn = (await ivs.create_stage())["stage"]["arn"]
    token = (await api_token(ivs, stage_arn))["token"]
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(events_url(token), protocols=[token])
        await ws.close()
    handshake = [r for r in caplog.records if r.name == "aiohttp.websocket"]
    assert handshake, "aiohttp no longer logs refused subprotocols: this test has nothing left to check"
    # The server's side: aiohttp and the emulator (this test's own boto3 debug lines are not its log).
    server = [r for r in caplog.records if r.name.startswith(("aiohttp", "services"))]
    assert [r.name for r in server if token in r.getMessage()] == []
