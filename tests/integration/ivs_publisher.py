"""A broadcaster that really publishes in the IVS emulator: it joins a Stage over the events socket
with a publish token and says `publish`, as the Web SDK does (no media is needed for IVS to count it
as publishing, and to replicate it)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp

from services.common.jwt_es384 import decode_unverified


class EmulatorPublisher:
    def __init__(self, token: dict[str, Any]) -> None:
        self.token = token
        self.participant_id = str(token["participantId"])
        _, claims = decode_unverified(token["token"])
        self._events_url = str(claims["events_url"])
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self.frames: list[dict[str, Any]] = []

    async def publish(self) -> EmulatorPublisher:
        """Joins and publishes; returns once the emulator says this participant publishes."""
        self._http = aiohttp.ClientSession()
        self._ws = await self._http.ws_connect(self._events_url)
        await self._ws.send_json({"type": "join", "token": self.token["token"]})
        await self._until(lambda frame: frame["type"] == "joined")
        await self._ws.send_json({"type": "publish"})
        await self._until(
            lambda frame: (
                frame["type"] == "publish-state"
                and frame.get("participantId") == self.participant_id
                and frame.get("publishing") is True
            )
        )
        self._reader = asyncio.create_task(self._drain())
        return self

    async def _until(self, wanted: Any) -> None:
        assert self._ws is not None
        async with asyncio.timeout(10):
            while True:
                frame = await self._ws.receive_json()
                self.frames.append(frame)
                assert frame["type"] != "error", frame
                if wanted(frame):
                    return

    async def _drain(self) -> None:
        assert self._ws is not None
        async for message in self._ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                self.frames.append(message.json())

    async def leave(self) -> None:
        """Leaves the Stage the way a closed tab does: the socket goes."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()
