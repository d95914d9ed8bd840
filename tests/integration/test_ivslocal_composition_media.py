"""The emulator's composition as real media: a WebRTC publisher on a Stage, a composition started through
boto3, and the HLS the emulator serves at /_playback/{channelId}/ decoded back into the publisher's video."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import av

from services.ivslocal.config import Settings
from tests.integration.ivs_publisher import VIDEO_HEIGHT, VIDEO_WIDTH, EmulatorPublisher
from tests.integration.ivslocal_fixtures import AsyncIvsClient, IvsLocalServer, running_ivslocal
from tests.integration.test_ivslocal_participants import api_token, participants
from tests.integration.waiting import eventually

CHANNEL_ID = "overflowChan1"
CHANNEL_ARN = f"arn:aws:ivs:us-east-1:123456789012:channel/{CHANNEL_ID}"
# Generous: ICE, DTLS and the first whole segment on a busy two-core machine.
MEDIA_WITHIN = 90.0
CORS = "Access-Control-Allow-Origin"


@dataclass
class Composing:
    server: IvsLocalServer
    ivs: AsyncIvsClient
    http: aiohttp.ClientSession
    stage_arn: str
    publisher: EmulatorPublisher
    composition_arn: str

    @property
    def playlist_url(self) -> str:
        return f"{self.server.url}/_playback/{CHANNEL_ID}/index.m3u8"


@asynccontextmanager
async def composing(tmp_path: Path) -> AsyncIterator[Composing]:
    """An emulator with a publisher sending synthetic video, and an ACTIVE composition of its Stage."""
    settings = Settings(port=0, composition_transition_seconds=0.2, media_dir=str(tmp_path))
    async with running_ivslocal(settings) as server, aiohttp.ClientSession() as http:
        ivs = server.client()
        stage_arn = (await ivs.create_stage(name="origin"))["stage"]["arn"]
        token = await api_token(ivs, stage_arn, capabilities=["PUBLISH"], userId="broadcaster")
        publisher = await EmulatorPublisher(token, media=True).publish()
        try:
            # A small picture keeps the emulator's encoder cheap on a busy machine.
            video = {"width": VIDEO_WIDTH, "height": VIDEO_HEIGHT, "framerate": 15, "bitrate": 400_000}
            encoder = (await ivs.create_encoder_configuration(name="small", video=video))[
                "encoderConfiguration"
            ]
            composition = (
                await ivs.start_composition(
                    stageArn=stage_arn,
                    destinations=[
                        {"channel": {"channelArn": CHANNEL_ARN, "encoderConfigurationArn": encoder["arn"]}}
                    ],
                )
            )["composition"]
            yield Composing(server, ivs, http, stage_arn, publisher, composition["arn"])
        finally:
            await publisher.leave()


async def fetch(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, str], bytes]:
    async with http.get(url) as response:
        return response.status, dict(response.headers), await response.read()


async def playlist(setup: Composing) -> str | None:
    status, _, body = await fetch(setup.http, setup.playlist_url)
    return body.decode() if status == 200 else None


async def ended_playlist(setup: Composing) -> str | None:
    text = await playlist(setup)
    return text if text is not None and "#EXT-X-ENDLIST" in text else None


def segments(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def media_sequence(text: str) -> int:
    return int(
        next(line for line in text.splitlines() if line.startswith("#EXT-X-MEDIA-SEQUENCE:")).split(":")[1]
    )


def decoded_frames(segment: bytes) -> list[tuple[int, int]]:
    """(width, V of the mean colour) of each video frame: a publisher's picture has the V of its chroma,
    the black that fills in while nobody publishes 128."""
    frames = []
    with av.open(io.BytesIO(segment), mode="r", format="mpegts") as container:
        for frame in container.decode(video=0):
            mean = frame.reformat(width=1, height=1, format="yuv444p")
            frames.append((frame.width, bytes(mean.planes[2])[0]))
    return frames


def shows(publisher: EmulatorPublisher, frame: tuple[int, int]) -> bool:
    width, v = frame
    return width == VIDEO_WIDTH and abs(v - publisher.chroma[1]) < 20


def assert_video_of(publisher: EmulatorPublisher, frames: list[tuple[int, int]]) -> None:
    assert frames, "no video frames in the segment"
    assert all(shows(publisher, frame) for frame in frames), frames


async def last_segment(setup: Composing, text: str) -> tuple[dict[str, str], bytes]:
    status, headers, body = await fetch(
        setup.http, f"{setup.server.url}/_playback/{CHANNEL_ID}/{segments(text)[-1]}"
    )
    assert status == 200, body
    return headers, body


async def showing(setup: Composing, publisher: EmulatorPublisher) -> str | None:
    """The playlist, once its newest segment is the publisher's video."""
    text = await playlist(setup)
    if text is None:
        return None
    status, _, segment = await fetch(
        setup.http, f"{setup.server.url}/_playback/{CHANNEL_ID}/{segments(text)[-1]}"
    )
    frames = await asyncio.to_thread(decoded_frames, segment) if status == 200 else []
    return text if frames and all(shows(publisher, frame) for frame in frames) else None


async def test_an_active_composition_serves_the_publishers_video_as_hls_until_it_stops(
    tmp_path: Path,
) -> None:
    async with composing(tmp_path) as setup:
        text = await eventually(lambda: playlist(setup), "the composition's playlist", within=MEDIA_WITHIN)
        status, headers, _ = await fetch(setup.http, setup.playlist_url)
        assert (status, headers["Content-Type"], headers[CORS]) == (200, "application/vnd.apple.mpegurl", "*")
        assert "#EXT-X-ENDLIST" not in text and segments(text)
        segment_headers, segment = await last_segment(setup, text)
        assert (segment_headers["Content-Type"], segment_headers[CORS]) == ("video/mp2t", "*")
        assert_video_of(setup.publisher, await asyncio.to_thread(decoded_frames, segment))

        # The publisher's page served one subscriber, which ListParticipants does not show, as in IVS.
        assert len(setup.publisher.peers) == 1
        session_id = str((await setup.ivs.get_stage(arn=setup.stage_arn))["stage"]["activeSessionId"])
        listed = await participants(setup.ivs, setup.stage_arn, session_id)
        assert list(listed) == [setup.publisher.participant_id]

        await setup.ivs.stop_composition(arn=setup.composition_arn)
        await eventually(lambda: not setup.publisher.peers, "the composition to unsubscribe", within=30)
        assert setup.publisher.unsubscribed == setup.publisher.subscribed
        final = await eventually(
            lambda: ended_playlist(setup), "the playlist to end with EXT-X-ENDLIST", within=30
        )
        # Ended means ended: the publisher sends on, the playlist stays as it was.
        await eventually(lambda: _stopped(setup), "the composition to be STOPPED", within=30)
        assert await playlist(setup) == final


async def test_the_composition_follows_the_publisher_that_comes_back_as_a_new_participant(
    tmp_path: Path,
) -> None:
    async with composing(tmp_path) as setup:
        before = await eventually(lambda: playlist(setup), "the composition's playlist", within=MEDIA_WITHIN)
        await setup.publisher.leave()
        token = await api_token(setup.ivs, setup.stage_arn, capabilities=["PUBLISH"], userId="broadcaster")
        # Another hue, so its picture cannot pass for the first publisher's frozen last frame.
        back = await EmulatorPublisher(token, media=True, chroma=(200, 90)).publish()
        try:
            assert back.participant_id != setup.publisher.participant_id
            await eventually(
                lambda: back.peers, "the composition to subscribe to the new participant", within=60
            )
            text = await eventually(
                lambda: showing(setup, back),
                "the stream to show the new participant",
                within=MEDIA_WITHIN,
                every=0.5,
            )
            # The same stream went on through the switch: no end, and its segments numbered on.
            assert "#EXT-X-ENDLIST" not in text
            assert media_sequence(text) + len(segments(text)) > media_sequence(before) + len(segments(before))
        finally:
            await back.leave()


async def test_playback_is_404_with_cors_until_a_segment_exists_and_off_when_media_is_off(
    tmp_path: Path,
) -> None:
    for settings in (
        Settings(port=0, media_dir=str(tmp_path)),
        Settings(port=0, composition_media=False),
    ):
        async with running_ivslocal(settings) as server, aiohttp.ClientSession() as http:
            for name in ("index.m3u8", "segment000000.ts"):
                status, headers, body = await fetch(http, f"{server.url}/_playback/{CHANNEL_ID}/{name}")
                assert (status, headers[CORS]) == (404, "*")
                assert 0 < len(body) < 100, body
            # Only stream files of plain names are served, never a path out of the media directory.
            status, _, _ = await fetch(http, f"{server.url}/_playback/{CHANNEL_ID}/..%2F..%2Fetc%2Fpasswd")
            assert status == 404


async def _stopped(setup: Composing) -> bool:
    composition = (await setup.ivs.get_composition(arn=setup.composition_arn))["composition"]
    return bool(composition["state"] == "STOPPED")


async def test_a_failed_composition_ends_its_stream_and_unsubscribes(tmp_path: Path) -> None:
    async with composing(tmp_path) as setup:
        await eventually(lambda: playlist(setup), "the composition's playlist", within=MEDIA_WITHIN)
        async with setup.http.post(
            f"{setup.server.url}/_emulator/compositions/fail", json={"arn": setup.composition_arn}
        ) as response:
            assert response.status == 200, await response.text()
        await eventually(lambda: not setup.publisher.peers, "the composition to unsubscribe", within=30)
        await eventually(lambda: ended_playlist(setup), "the playlist to end with EXT-X-ENDLIST", within=30)
