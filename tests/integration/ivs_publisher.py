"""A broadcaster on one Stage that really publishes in the IVS emulator (tools.ivs_publisher's join),
for tests that drive the page's steps one by one: publish, leave, come back as a new participant.

With media=True it also answers subscriptions as web/js/local-stage.js does (a `subscribe` gets an
`offer` of its tracks, then `answer` and `candidate` complete it, `unsubscribe` ends it), sending a
synthetic video track (and silence) with aiortc, so media really flows to whoever subscribes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
from typing import Any

import aiohttp
import av
from aiortc import AudioStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import VideoStreamTrack
from aiortc.sdp import candidate_from_sdp

from tools.ivs_publisher import join_and_publish

VIDEO_WIDTH, VIDEO_HEIGHT = 320, 240


class SyntheticVideo(VideoStreamTrack):
    """A camera stand-in: frames of one hue (`chroma`, the U and V of every pixel) whose brightness
    changes every frame, paced at aiortc's 30 fps."""

    def __init__(self, chroma: tuple[int, int]) -> None:
        super().__init__()
        self._chroma = chroma
        self._count = 0

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = av.VideoFrame(VIDEO_WIDTH, VIDEO_HEIGHT, "yuv420p")
        self._count += 1
        for plane, value in zip(frame.planes, (self._count % 220 + 16, *self._chroma), strict=True):
            plane.update(bytes([value]) * plane.buffer_size)
        frame.pts, frame.time_base = pts, fractions.Fraction(time_base)
        return frame


class EmulatorPublisher:
    def __init__(
        self, token: dict[str, Any], *, media: bool = False, chroma: tuple[int, int] = (90, 200)
    ) -> None:
        self.token = token
        self.participant_id = str(token["participantId"])
        self.media = media
        self.chroma = chroma
        # (subscriber id, subscription id) -> the peer connection sending to it, while it lasts.
        self.peers: dict[tuple[str, str], RTCPeerConnection] = {}
        # Every subscription ever asked for, and every one the subscriber ended, in order.
        self.subscribed: list[tuple[str, str]] = []
        self.unsubscribed: list[tuple[str, str]] = []
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None

    async def publish(self) -> EmulatorPublisher:
        """Joins and publishes; returns once the emulator says this participant publishes."""
        self._http = aiohttp.ClientSession()
        self._ws, self.participant_id = await join_and_publish(self._http, self.token["token"])
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        # Read on, so the socket's pings are answered and the emulator keeps the participant.
        assert self._ws is not None
        async for message in self._ws:
            if self.media and message.type == aiohttp.WSMsgType.TEXT:
                await self._on_frame(json.loads(message.data))

    async def _on_frame(self, frame: dict[str, Any]) -> None:
        key = (str(frame.get("from")), str(frame.get("id")))
        kind = frame.get("type")
        if kind == "subscribe":
            self.subscribed.append(key)
            await self._offer(
                key, audio=frame.get("audio") is not False, video=frame.get("video") is not False
            )
        elif kind == "answer" and key in self.peers:
            await self.peers[key].setRemoteDescription(RTCSessionDescription(sdp=frame["sdp"], type="answer"))
        elif kind == "candidate" and key in self.peers:
            candidate = frame.get("candidate")
            if isinstance(candidate, dict) and candidate.get("candidate"):
                parsed = candidate_from_sdp(candidate["candidate"].split(":", 1)[1])
                parsed.sdpMid = candidate.get("sdpMid")
                parsed.sdpMLineIndex = candidate.get("sdpMLineIndex")
                await self.peers[key].addIceCandidate(parsed)
        elif kind == "unsubscribe":
            self.unsubscribed.append(key)
            peer = self.peers.pop(key, None)
            if peer is not None:
                await peer.close()

    async def _offer(self, key: tuple[str, str], *, audio: bool, video: bool) -> None:
        assert self._ws is not None
        peer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.peers[key] = peer
        if video:
            peer.addTrack(SyntheticVideo(self.chroma))
        if audio:
            peer.addTrack(AudioStreamTrack())
        # aiortc's offer carries its candidates, so no candidate frames follow it.
        await peer.setLocalDescription(await peer.createOffer())
        await self._ws.send_json(
            {"type": "offer", "to": key[0], "id": key[1], "sdp": peer.localDescription.sdp}
        )

    async def leave(self) -> None:
        """Leaves the Stage the way a closed tab does: the socket goes."""
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        for peer in list(self.peers.values()):
            await peer.close()
        self.peers.clear()
        if self._http is not None:
            await self._http.close()
