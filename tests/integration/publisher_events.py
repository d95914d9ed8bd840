"""A test broadcaster: follows the publisher event stream and reports publishing on every Stage."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt

from protos.fanout.v1 import allocator_pb2, stagemanager_pb2
from services.common.jwt_es384 import decode_unverified
from tests.integration.system import System
from tools.sse_client import read_events


@dataclass
class Broadcaster:
    """Joins (reports LIVE) each Stage it is told about, the way the broadcast page does."""

    system: System
    room: str = "main"
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    live: dict[str, float] = field(default_factory=dict)
    removed: set[str] = field(default_factory=set)
    bad_tokens: list[str] = field(default_factory=list)
    drops: list[str] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None
    _public_keys: dict[str, str] = field(default_factory=dict)

    async def __aenter__(self) -> Broadcaster:
        self._task = asyncio.create_task(self._follow())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def names(self) -> list[str]:
        return [name for name, _ in self.events]

    async def _follow(self) -> None:
        """Like the page: a stream that ends is opened again, and its snapshot re-syncs."""
        while "room-ended" not in self.names():
            try:
                await self._follow_once()
            except (aiohttp.ClientError, AssertionError) as error:
                self.drops.append(repr(error))
            else:
                self.drops.append("stream ended")
            await asyncio.sleep(0.2)

    async def _follow_once(self) -> None:
        url = f"{self.system.gateway_url}/api/rooms/{self.room}/publisher/events"
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as http,
            http.get(url, headers=self.system.publisher_headers()) as response,
        ):
            assert response.status == 200, await response.text()
            assert response.headers["Content-Type"].startswith("text/event-stream")
            async for name, data in read_events(response):
                self.events.append((name, data))
                await self._handle(name, data)

    async def _handle(self, name: str, data: dict[str, Any]) -> None:
        if name == "snapshot":
            for token in data["tokens"]:
                await self._go_live(token)
        elif name == "stage-added":
            await self._go_live(data)
        elif name == "stage-removed":
            self.removed.add(data["stageArn"])
            self.live.pop(data["stageArn"], None)

    async def _go_live(self, token: dict[str, Any]) -> None:
        await self._check_token(token)
        arn = token["stageArn"]
        stagemanager, allocator = self.system.stagemanager, self.system.allocator
        await stagemanager.ReportPublisherStatus(
            stagemanager_pb2.ReportPublisherStatusRequest(room=self.room, stage_arn=arn, publishing=True)
        )
        # Only once the allocator has seen the change does LIVE count for placement checks.
        revision = (await stagemanager.GetRoom(stagemanager_pb2.GetRoomRequest(room=self.room))).revision
        with contextlib.suppress(Exception):
            await allocator.IssuePublisherTokens(
                allocator_pb2.IssuePublisherTokensRequest(
                    room=self.room, user_id="probe", min_revision=revision, stage_arns=[arn]
                )
            )
            self.live[arn] = time.monotonic()

    async def _check_token(self, token: dict[str, Any]) -> None:
        header, _ = decode_unverified(token["token"])
        kid = header["kid"]
        if kid not in self._public_keys:
            described = await asyncio.to_thread(self.system.ivs.boto3_client().get_public_key, arn=kid)
            self._public_keys[kid] = described["publicKey"]["publicKeyMaterial"]
        try:
            claims = jwt.decode(token["token"], self._public_keys[kid], algorithms=["ES384"])
        except jwt.PyJWTError:
            self.bad_tokens.append(token["stageArn"])
            return
        if claims["resource"] != token["stageArn"] or not claims["capabilities"]["allow_publish"]:
            self.bad_tokens.append(token["stageArn"])
