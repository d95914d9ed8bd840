"""A broadcaster on one Stage that really publishes in the IVS emulator (tools.ivs_publisher's join),
for tests that drive the page's steps one by one: publish, leave, come back as a new participant."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp

from tools.ivs_publisher import join_and_publish


class EmulatorPublisher:
    def __init__(self, token: dict[str, Any]) -> None:
        self.token = token
        self.participant_id = str(token["participantId"])
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None

    async def publish(self) -> EmulatorPublisher:
        """Joins and publishes; returns once the emulator says this participant publishes."""
        self._http = aiohttp.ClientSession()
        self._ws, self.participant_id = await join_and_publish(self._http, self.token["token"])
        self._reader = asyncio.create_task(self._drain())
        return self

    async def _drain(self) -> None:
        # Read on, so the socket's pings are answered and the emulator keeps the participant.
        assert self._ws is not None
        async for _ in self._ws:
            pass

    async def leave(self) -> None:
        """Leaves the Stage the way a closed tab does: the socket goes."""
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._http is not None:
            await self._http.close()
