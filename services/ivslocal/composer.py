"""The emulator's compositions as real media: each ACTIVE one subscribes to its Stage's publisher with
aiortc, over the signalling the pages use, and writes HLS for its channel destination.

IVS composes every publisher of the Stage into one picture; this subscribes to one publisher at a time
(the earliest to join of those publishing), follows it when it leaves and comes back as a new
participant, and fills in black while nobody publishes. Only the first channel destination gets media.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.sdp import candidate_from_sdp

from services.ivslocal.compositions import ACTIVE, Composition
from services.ivslocal.errors import IvsApiError
from services.ivslocal.events import StageSockets, StageTap
from services.ivslocal.hls import HlsWriter, VideoFormat
from services.ivslocal.model import IvsState

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25
# As the page's Subscription: no media by then and the attempt is given up, then retried with backoff.
SUBSCRIBE_TIMEOUT_SECONDS = 15.0
RETRY_MAX_SECONDS = 8.0


def channel_id(channel_arn: str) -> str:
    """arn:aws:ivs:REGION:ACCOUNT:channel/ID -> ID, the name of the channel's playback directory."""
    return channel_arn.rsplit("/", 1)[-1]


class CompositionMedia:
    """Keeps one StageRecorder for each ACTIVE composition with a channel destination, no longer.

    Compositions change by time alone (the model settles them), so this looks at them every
    POLL_SECONDS. HLS goes to `root`/<channel id>/; with no root, a temporary directory is made at
    start and removed at close.
    """

    def __init__(self, state: IvsState, sockets: StageSockets, root: Path | None = None) -> None:
        self._state = state
        self._sockets = sockets
        self._given_root = root
        self._root: Path | None = root
        self._recorders: dict[str, StageRecorder] = {}
        self._task: asyncio.Task[None] | None = None

    def read_playback_file(self, channel: str, name: str) -> bytes | None:
        """A file of the channel's stream, None if there is none (the playlist only appears with its first
        segment). Blocking: call it in a thread. `channel` and `name` must be plain file names."""
        if self._root is None:
            return None
        try:
            return (self._root / channel / name).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None  # not yet, or a segment that just slid out of the window

    async def start(self) -> None:
        if self._root is None:
            self._root = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="ivslocal-media-"))
        log.info("composition media goes to %s", self._root)
        self._task = asyncio.create_task(self._follow())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for arn in list(self._recorders):
            await self._recorders.pop(arn).close()
        if self._given_root is None and self._root is not None:
            await asyncio.to_thread(shutil.rmtree, self._root, True)

    async def _follow(self) -> None:
        while True:
            try:
                await self._sync()
            except Exception:
                log.exception("following the compositions failed")
            await asyncio.sleep(POLL_SECONDS)

    async def _sync(self) -> None:
        active = {c.arn: c for c in self._compositions() if c.state == ACTIVE}
        for arn in [arn for arn in self._recorders if arn not in active]:
            await self._recorders.pop(arn).close()
        for arn, composition in active.items():
            if arn not in self._recorders:
                recorder = await self._recorder_for(composition)
                if recorder is not None:
                    self._recorders[arn] = recorder

    def _compositions(self) -> list[Composition]:
        compositions: list[Composition] = []
        next_token: str | None = None
        while True:
            page = self._state.list_compositions(next_token=next_token)
            compositions.extend(page.items)
            next_token = page.next_token
            if next_token is None:
                return compositions

    async def _recorder_for(self, composition: Composition) -> StageRecorder | None:
        destination = next(
            (d for d in composition.destinations if d.broadcasting and d.channel_arn is not None), None
        )
        if destination is None or destination.channel_arn is None or self._root is None:
            return None
        video = VideoFormat()
        for arn in destination.encoder_configuration_arns:
            with contextlib.suppress(IvsApiError):  # deleted since: IVS's defaults then
                settings = self._state.get_encoder_configuration(arn).video
                video = VideoFormat(
                    int(settings["width"]),
                    int(settings["height"]),
                    float(settings["framerate"]),
                    int(settings["bitrate"]),
                )
        directory = self._root / channel_id(destination.channel_arn)
        # A channel composed before starts afresh: an old playlist must not be served as this one.
        await asyncio.to_thread(shutil.rmtree, directory, True)
        await asyncio.to_thread(directory.mkdir, parents=True)
        writer = HlsWriter(directory, video)
        recorder = StageRecorder(
            self._sockets, composition.stage_arn, f"composition-{composition.composition_id}", writer
        )
        try:
            recorder.start()
        except IvsApiError as error:  # the Stage went away meanwhile; the model stops the composition
            log.info("composition %s has no Stage to record: %s", composition.arn, error.message)
            await writer.close()
            return None
        log.info("composition %s records %s into %s", composition.arn, composition.stage_arn, directory)
        return recorder


class StageRecorder:
    """One subscriber on a Stage, as a page subscribes, feeding an HlsWriter while it runs."""

    def __init__(self, sockets: StageSockets, stage_arn: str, subscriber_id: str, writer: HlsWriter) -> None:
        self._sockets = sockets
        self._stage_arn = stage_arn
        self._subscriber_id = subscriber_id
        self._writer = writer
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._tap: StageTap | None = None
        self._task: asyncio.Task[None] | None = None
        # Publishing participants in join order; the first is the one recorded.
        self._publishers: dict[str, None] = {}
        self._subscription: _Subscription | None = None
        self._retry_at = 0.0
        self._retries = 0

    def start(self) -> None:
        """Attaches to the Stage (raising ResourceNotFoundError if it is gone) and starts following it."""
        self._writer.start()
        self._tap = self._sockets.attach(self._stage_arn, self._subscriber_id, self._inbox.put_nowait)
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._end_subscription(tell=True)
        if self._tap is not None:
            self._tap.close()
        await self._writer.close()

    async def _run(self) -> None:
        while True:
            try:
                frame = await asyncio.wait_for(self._inbox.get(), POLL_SECONDS)
            except TimeoutError:
                frame = None
            try:
                if frame is not None:
                    await self._on_frame(frame)
                await self._check()
            except Exception:
                log.exception("recording %s: a signalling step failed", self._stage_arn)
                await self._fail()

    async def _on_frame(self, frame: dict[str, Any]) -> None:
        kind, subscription = frame.get("type"), self._subscription
        mine = subscription is not None and frame.get("from") == subscription.publisher_id
        if kind == "joined":
            for info in frame.get("participants", []):
                if info.get("isPublishing"):
                    self._publishers[str(info["id"])] = None
        elif kind == "participant-joined" and frame["participant"].get("isPublishing"):
            self._publishers[str(frame["participant"]["id"])] = None
        elif kind == "participant-left" or (kind == "publish-state" and not frame.get("publishing")):
            gone = str(frame.get("participantId"))
            self._publishers.pop(gone, None)
            if subscription is not None and subscription.publisher_id == gone:
                # Its page has dropped our peer already, as it does for any subscriber.
                await self._end_subscription(tell=False)
                self._retry_at, self._retries = 0.0, 0
        elif kind == "publish-state":
            self._publishers[str(frame.get("participantId"))] = None
        elif subscription is not None and frame.get("id") == subscription.subscription_id:
            if kind == "offer" and mine:
                await subscription.answer(str(frame["sdp"]))
            elif kind == "candidate" and mine:
                await subscription.add_candidate(frame.get("candidate"))
            elif kind == "error":
                log.info("recording %s: subscribe refused: %s", self._stage_arn, frame.get("message"))
                await self._fail()

    async def _check(self) -> None:
        subscription = self._subscription
        if subscription is not None:
            if subscription.failed or (
                not subscription.receiving
                and time.monotonic() - subscription.started > SUBSCRIBE_TIMEOUT_SECONDS
            ):
                await self._fail()
            elif subscription.receiving:
                self._retries = 0
            return
        if self._publishers and time.monotonic() >= self._retry_at and self._tap is not None:
            publisher_id = next(iter(self._publishers))
            self._subscription = _Subscription(self._tap, publisher_id, self._writer)
            self._subscription.subscribe()
            log.info("recording %s: subscribing to %s", self._stage_arn, publisher_id)

    async def _fail(self) -> None:
        await self._end_subscription(tell=True)
        self._retry_at = time.monotonic() + min(RETRY_MAX_SECONDS, 2.0**self._retries)
        self._retries += 1

    async def _end_subscription(self, *, tell: bool) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            await subscription.close(tell=tell)


class _Subscription:
    """One subscription to one publisher: answer its offer, pump the tracks into the writer."""

    def __init__(self, tap: StageTap, publisher_id: str, writer: HlsWriter) -> None:
        self.tap = tap
        self.publisher_id = publisher_id
        self.subscription_id = secrets.token_hex(6)
        self.started = time.monotonic()
        self.receiving = False
        self.failed = False
        self._writer = writer
        # No STUN: host candidates are enough on one machine, and the emulator must not call out.
        self._pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self._pumps: list[asyncio.Task[None]] = []
        self._pc.on("track", self._on_track)
        self._pc.on("connectionstatechange", self._on_state)

    def subscribe(self) -> None:
        self._send({"type": "subscribe", "audio": True, "video": True})

    async def answer(self, sdp: str) -> None:
        await self._pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        # aiortc gathers its candidates before setLocalDescription returns: they travel in the answer.
        await self._pc.setLocalDescription(await self._pc.createAnswer())
        self._send({"type": "answer", "sdp": self._pc.localDescription.sdp})

    async def add_candidate(self, candidate: object) -> None:
        if not isinstance(candidate, dict) or not candidate.get("candidate"):
            return  # the end of the publisher's candidates
        parsed = candidate_from_sdp(str(candidate["candidate"]).split(":", 1)[1])
        parsed.sdpMid = candidate.get("sdpMid")
        parsed.sdpMLineIndex = candidate.get("sdpMLineIndex")
        await self._pc.addIceCandidate(parsed)

    async def close(self, *, tell: bool) -> None:
        if tell:
            self._send({"type": "unsubscribe"})
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        await self._pc.close()

    def _send(self, frame: dict[str, Any]) -> None:
        self.tap.send({**frame, "to": self.publisher_id, "id": self.subscription_id})

    def _on_track(self, track: MediaStreamTrack) -> None:
        self._pumps.append(asyncio.create_task(self._pump(track)))

    def _on_state(self) -> None:
        # "closed" before close() was called here: the publisher's page dropped the peer on its side.
        if self._pc.connectionState in ("failed", "closed"):
            self.failed = True

    async def _pump(self, track: MediaStreamTrack) -> None:
        # aiortc decodes in its own thread; recv() hands over a decoded frame without blocking the loop.
        put = self._writer.put_video if track.kind == "video" else self._writer.put_audio
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            self.receiving = True
            put(frame, self)  # type: ignore[arg-type]
