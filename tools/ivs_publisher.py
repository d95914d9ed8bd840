"""A broadcaster without a browser: joins and publishes on each origin over the IVS emulator's events socket.

It follows the gateway's publisher event stream as the broadcast page does (the `snapshot` re-syncs the
set of Stages, `stage-added` joins one, `stage-removed` leaves one, `room-ended` ends it; a stream that
drops is opened again). On each Stage it opens the token's `events_url`, sends ``{"type": "join",
"token"}`` then ``{"type": "publish"}`` (protocol: services/ivslocal/events.py), waits for the emulator's
``publish-state`` naming its participant, and only then reports ``POST /api/rooms/{room}/publisher/status``
``{"stageArn", "publishing": true, "participantId"}``: the participant the stage manager replicates into
the origin's replicas. It sends no media and answers no subscriptions; what it gives IVS is a publishing
participant, which is what the monitor, placement and server-side replication act on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp

from services.common.jwt_es384 import decode_unverified
from tools.sse_client import read_events

log = logging.getLogger(__name__)

JOIN_TIMEOUT_SECONDS = 10.0
RECONNECT_SECONDS = 0.5


class PublishRefused(Exception):
    """The emulator or the gateway turned the broadcaster away on one Stage."""


@dataclass(frozen=True)
class PublishedStage:
    stage_arn: str
    participant_id: str
    # time.monotonic() when the emulator confirmed the publish.
    published_at: float


@dataclass
class _StageLink:
    ws: aiohttp.ClientWebSocketResponse
    published: PublishedStage
    reader: asyncio.Task[None] | None = None
    leaving: bool = False


class IvsPublisher:
    """One broadcaster in `room` of the gateway at `base_url`, for as long as the context is open.

    `published` is what it publishes on now; `problems` says what went wrong, in order (a refused
    join, a report the gateway refused, a Stage that dropped it).
    """

    def __init__(
        self,
        base_url: str,
        publisher_key: str,
        room: str = "main",
        join_timeout_seconds: float = JOIN_TIMEOUT_SECONDS,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {publisher_key}"}
        self._room = room
        self._join_timeout = join_timeout_seconds
        self._links: dict[str, _StageLink] = {}
        self._changed = asyncio.Condition()
        self._http: aiohttp.ClientSession | None = None
        self._follower: asyncio.Task[None] | None = None
        self.problems: list[str] = []
        self.room_ended = False

    @property
    def published(self) -> dict[str, PublishedStage]:
        return {arn: link.published for arn, link in self._links.items() if not link.leaving}

    async def __aenter__(self) -> IvsPublisher:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        self._follower = asyncio.create_task(self._follow())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)
        for arn in list(self._links):
            await self._leave(arn)
        if self._http is not None:
            await self._http.close()

    async def wait_publishing(self, stages: int = 1, within_seconds: float = JOIN_TIMEOUT_SECONDS) -> None:
        """Returns once it publishes on at least `stages` Stages; else TimeoutError naming the problems."""

        async def enough() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.published) >= stages)

        try:
            await asyncio.wait_for(enough(), within_seconds)
        except TimeoutError:
            raise TimeoutError(
                f"the broadcaster publishes on {len(self.published)} Stage(s), not {stages}, after "
                f"{within_seconds:.0f} s; problems: {self.problems or 'none'}"
            ) from None

    # --- the publisher event stream ------------------------------------------------------------

    async def _follow(self) -> None:
        while not self.room_ended:
            try:
                await self._follow_once()
            except (aiohttp.ClientError, ValueError, KeyError) as error:
                self._problem(f"publisher events: {error!r}")
            if not self.room_ended:
                await asyncio.sleep(RECONNECT_SECONDS)

    async def _follow_once(self) -> None:
        assert self._http is not None
        url = f"{self._base}/api/rooms/{self._room}/publisher/events"
        async with self._http.get(url, headers=self._headers) as response:
            if response.status != 200:
                raise aiohttp.ClientResponseError(
                    response.request_info, (), status=response.status, message=(await response.text())[:200]
                )
            async for name, data in read_events(response):
                if name == "snapshot":
                    offered = {token["stageArn"] for token in data["tokens"]}
                    for arn in set(self._links) - offered:
                        await self._leave(arn)
                    for token in data["tokens"]:
                        await self._publish_on(token)
                elif name == "stage-added":
                    await self._publish_on(data)
                elif name == "stage-removed":
                    await self._leave(data["stageArn"])
                elif name == "room-ended":
                    self.room_ended = True
                    for arn in list(self._links):
                        await self._leave(arn)
                    return

    # --- one Stage -------------------------------------------------------------------------------

    async def _publish_on(self, token: dict[str, Any]) -> None:
        arn = token["stageArn"]
        if arn in self._links:
            return
        try:
            published = await asyncio.wait_for(
                self._join_and_publish(arn, token["token"]), self._join_timeout
            )
        except (PublishRefused, aiohttp.ClientError, TimeoutError, ValueError, KeyError) as error:
            self._problem(f"Stage {arn}: {error!r}")
            return
        try:
            await self._report(arn, published.participant_id)
        except (PublishRefused, aiohttp.ClientError) as error:
            self._problem(f"Stage {arn}: {error!r}")

    async def _join_and_publish(self, arn: str, token: str) -> PublishedStage:
        assert self._http is not None
        ws, participant_id = await join_and_publish(self._http, token)
        published = PublishedStage(arn, participant_id, time.monotonic())
        link = _StageLink(ws, published)
        link.reader = asyncio.create_task(self._read_until_closed(arn, link))
        async with self._changed:
            self._links[arn] = link
            self._changed.notify_all()
        return published

    async def _report(self, arn: str, participant_id: str) -> None:
        assert self._http is not None
        async with self._http.post(
            f"{self._base}/api/rooms/{self._room}/publisher/status",
            json={"stageArn": arn, "publishing": True, "participantId": participant_id},
            headers=self._headers,
        ) as response:
            if response.status != 204:
                raise PublishRefused(f"publisher/status answered {response.status}: {await response.text()}")

    async def _read_until_closed(self, arn: str, link: _StageLink) -> None:
        """Keeps the socket read (pings answered); a Stage that drops us is a problem, not a crash."""
        reason = "the socket closed"
        async for message in link.ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            frame = json.loads(message.data)
            if frame.get("type") == "stage-left":
                reason = f"stage-left {frame.get('reason')}"
        if not link.leaving:
            self._problem(f"Stage {arn} dropped the broadcaster: {reason} (code {link.ws.close_code})")
            async with self._changed:
                if self._links.get(arn) is link:
                    del self._links[arn]
                self._changed.notify_all()

    async def _leave(self, arn: str) -> None:
        link = self._links.get(arn)
        if link is None:
            return
        link.leaving = True
        with contextlib.suppress(ConnectionError, RuntimeError):
            await link.ws.send_json({"type": "leave"})
        await link.ws.close()
        if link.reader is not None:
            await asyncio.gather(link.reader, return_exceptions=True)
        async with self._changed:
            self._links.pop(arn, None)
            self._changed.notify_all()

    def _problem(self, text: str) -> None:
        log.warning("broadcaster in room %s: %s", self._room, text)
        self.problems.append(text)


async def join_and_publish(
    http: aiohttp.ClientSession, token: str
) -> tuple[aiohttp.ClientWebSocketResponse, str]:
    """Joins the token's Stage over the emulator's events socket and publishes; returns the open
    socket (closing it leaves the Stage) and the participant id, once the emulator says it publishes."""
    _, claims = decode_unverified(token)
    ws = await http.ws_connect(str(claims["events_url"]))
    try:
        await ws.send_json({"type": "join", "token": token})
        joined = await _next_frame(ws, lambda frame: frame["type"] == "joined")
        participant_id = str(joined["participant"]["id"])
        await ws.send_json({"type": "publish"})
        await _next_frame(
            ws,
            lambda frame: (
                frame["type"] == "publish-state"
                and frame.get("participantId") == participant_id
                and frame.get("publishing") is True
            ),
        )
    except BaseException:
        await ws.close()
        raise
    return ws, participant_id


async def _next_frame(
    ws: aiohttp.ClientWebSocketResponse, wanted: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The first frame `wanted` accepts; an `error` frame or a closed socket raises PublishRefused."""
    async for message in ws:
        if message.type != aiohttp.WSMsgType.TEXT:
            continue
        frame = json.loads(message.data)
        if not isinstance(frame, dict):
            continue
        if frame.get("type") == "error":
            raise PublishRefused(f"{frame.get('name')}: {frame.get('message')}")
        if wanted(frame):
            return frame
    raise PublishRefused(f"the events socket closed (code {ws.close_code})")
