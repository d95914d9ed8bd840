"""Decoded video and audio frames in, a live HLS stream (H.264 + AAC, short segments) out, in a thread."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import av.filter
from av.audio.resampler import AudioResampler
from av.container import OutputContainer
from av.video.frame import PictureType

log = logging.getLogger(__name__)

PLAYLIST = "index.m3u8"
VIDEO_TIME_BASE = Fraction(1, 90_000)
AUDIO_RATE = 48_000
# How far behind the wall clock a source may fall before black video or silence fills in: more than the
# jitter of a live WebRTC track, little enough that a player's buffer (a few segments) never runs dry.
FILL_AFTER_SECONDS = 0.5
# Frames per second of filler video while nothing arrives.
FILL_FPS = 5
# A source silent this long is gone (it left, or is reconnecting): black instead of its frozen picture.
# Shorter gaps are a busy machine's or a network's stalls, where freezing looks like what they are.
FREEZE_SECONDS = 3.0
# A source whose timestamps drift this far from when its frames arrive is timed anew (a stall, a skip).
RESYNC_SECONDS = 1.0
# Audio that ends this close to where it should is written as it comes, without silence in between.
AUDIO_TOLERANCE_SECONDS = 0.1
AAC_FRAME_SAMPLES = 1024
QUEUE_FRAMES = 120


@dataclass(frozen=True)
class VideoFormat:
    """The picture the stream carries: sources are scaled into this box, letterboxed, as IVS composes."""

    width: int = 1280
    height: int = 720
    framerate: float = 30.0
    bitrate: int = 2_500_000


@dataclass(frozen=True)
class _Frame:
    frame: av.VideoFrame | av.AudioFrame
    source: object
    arrived: float


_STOP = object()


class _SourceClock:
    """Output times for one kind of frame: a source's own timestamps, anchored where its first frame
    arrived on the stream's clock, so the motion stays smooth yet a new source lines up with the old."""

    def __init__(self) -> None:
        self._source: object = None
        self._offset = 0.0

    def seconds(self, source: object, source_seconds: float | None, arrived: float) -> float:
        if source_seconds is None:
            at = arrived
        else:
            at = source_seconds + self._offset
            if source is not self._source or abs(at - arrived) > RESYNC_SECONDS:
                self._source, self._offset = source, arrived - source_seconds
                at = arrived
        return at


class HlsWriter:
    """Writes `directory`/index.m3u8 (a sliding window of ~1 s segments) from frames put from the loop.

    put_video and put_audio never block: a worker thread scales, encodes and muxes, and frames the
    encoder cannot keep up with are dropped. The stream starts at the first video frame; after that,
    filler video (a short stall freezes the picture, a longer absence is black) and silence keep it
    going while no source sends, so the playlist stays live across a publisher's reconnect. close()
    ends the playlist with EXT-X-ENDLIST.
    """

    def __init__(
        self, directory: Path, video: VideoFormat, *, segment_seconds: float = 1.0, playlist_segments: int = 6
    ) -> None:
        self.directory = directory
        self._video = video
        self._segment_seconds = segment_seconds
        self._playlist_segments = playlist_segments
        self._queue: queue.Queue[_Frame | object] = queue.Queue(QUEUE_FRAMES)
        self._thread = threading.Thread(target=self._run, name=f"hls-{directory.name}", daemon=True)
        self._dropped = 0

    def start(self) -> None:
        self._thread.start()

    def put_video(self, frame: av.VideoFrame, source: object) -> None:
        self._put(_Frame(frame, source, time.monotonic()))

    def put_audio(self, frame: av.AudioFrame, source: object) -> None:
        self._put(_Frame(frame, source, time.monotonic()))

    def _put(self, item: _Frame) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._dropped += 1
            if self._dropped in (1, 100) or self._dropped % 1000 == 0:
                log.warning("HLS writer for %s is behind: %d frames dropped", self.directory, self._dropped)

    async def close(self) -> None:
        """Ends the stream and waits for the worker to write its last segment and the playlist's end."""
        if not self._thread.is_alive():
            return
        await asyncio.to_thread(self._queue.put, _STOP)
        await asyncio.to_thread(self._thread.join)

    # --- the worker thread ----------------------------------------------------------------------

    def _run(self) -> None:
        stream: _Stream | None = None
        try:
            while True:
                try:
                    item = self._queue.get(timeout=1 / FILL_FPS)
                except queue.Empty:
                    item = None
                if item is _STOP:
                    break
                if isinstance(item, _Frame):
                    if stream is None and isinstance(item.frame, av.VideoFrame):
                        stream = _Stream(
                            self.directory, self._video, self._segment_seconds, self._playlist_segments
                        )
                        stream.open(item.arrived)
                    if stream is not None:
                        stream.write(item)
                if stream is not None:
                    stream.fill(time.monotonic())
        except Exception:
            log.exception("HLS writer for %s failed", self.directory)
        finally:
            if stream is not None:
                stream.close()


class _Stream:
    """The open container and its two encoders; used by the writer's thread only."""

    def __init__(
        self, directory: Path, video: VideoFormat, segment_seconds: float, playlist_segments: int
    ) -> None:
        self._directory = directory
        self._format = video
        self._segment_seconds = segment_seconds
        self._playlist_segments = playlist_segments
        self._video_clock = _SourceClock()
        self._graph: av.filter.Graph | None = None
        self._graph_input: tuple[int, int, str] | None = None
        self._last_video = -1.0
        self._last_picture: av.VideoFrame | None = None
        self._last_key = -1.0e9
        self._last_source_video = 0.0
        self._last_source_audio = 0.0
        # AAC takes 1024 samples a frame: every source's audio is resampled, queued, and read in 1024s.
        self._resamplers: dict[tuple[str, str, int], AudioResampler] = {}
        self._fifo = av.AudioFifo()
        self._queued_samples = 0
        self._encoded_samples = 0

    def open(self, start: float) -> None:
        self._start = start
        self._container: OutputContainer = av.open(
            str(self._directory / PLAYLIST),
            mode="w",
            format="hls",
            options={
                "hls_time": f"{self._segment_seconds:g}",
                "hls_list_size": str(self._playlist_segments),
                # temp_file: a segment appears under its name only once complete, so the server never
                # serves half a segment; delete_segments keeps the directory as small as the window.
                "hls_flags": "delete_segments+independent_segments+temp_file",
                "hls_segment_filename": str(self._directory / "segment%06d.ts"),
            },
        )
        video = self._container.add_stream(
            "libx264",
            rate=round(self._format.framerate),
            # zerolatency: no B-frames and no lookahead, so a frame leaves the encoder as it goes in.
            options={"preset": "ultrafast", "tune": "zerolatency", "forced-idr": "1"},
        )
        video.width, video.height = self._format.width, self._format.height
        video.pix_fmt = "yuv420p"
        video.bit_rate = self._format.bitrate
        video.time_base = VIDEO_TIME_BASE
        video.codec_context.time_base = VIDEO_TIME_BASE
        # Keyframes are forced once per segment (see _encode_video); this only keeps x264 from adding more.
        video.codec_context.gop_size = 10 * round(self._format.framerate * self._segment_seconds) + 1
        self._video = video
        audio = self._container.add_stream("aac", rate=AUDIO_RATE, layout="stereo")
        audio.time_base = Fraction(1, AUDIO_RATE)
        self._audio = audio
        black = av.VideoFrame(self._format.width, self._format.height, "yuv420p")
        for plane, value in zip(black.planes, (16, 128, 128), strict=True):
            plane.update(bytes([value]) * plane.buffer_size)
        self._black = black
        self._last_source_video = self._last_source_audio = start
        log.info("composition HLS started in %s", self._directory)

    def write(self, item: _Frame) -> None:
        frame = item.frame
        if isinstance(frame, av.VideoFrame):
            self._last_source_video = item.arrived
            source_seconds = (
                float(frame.pts * frame.time_base) if frame.pts is not None and frame.time_base else None
            )
            at = self._video_clock.seconds(item.source, source_seconds, item.arrived) - self._start
            self._last_picture = self._scaled(frame)
            self._encode_video(self._last_picture, at)
        else:
            self._last_source_audio = item.arrived
            # Audio is timed by its samples; a frame that starts well after the stream's audio ends
            # leaves a hole, which silence fills, and one far ahead (a burst after a stall) is dropped.
            rate = frame.sample_rate or AUDIO_RATE
            starts = item.arrived - self._start - frame.samples / rate
            if self._queued_samples / AUDIO_RATE < starts - AUDIO_TOLERANCE_SECONDS:
                self._silence_until(starts)
            elif self._queued_samples / AUDIO_RATE > starts + RESYNC_SECONDS:
                return
            key = (frame.format.name, frame.layout.name, rate)
            resampler = self._resamplers.get(key)
            if resampler is None:
                resampler = self._resamplers[key] = AudioResampler(
                    format="fltp", layout="stereo", rate=AUDIO_RATE
                )
            frame.pts = None
            for resampled in resampler.resample(frame):
                self._queue_audio(resampled)

    def fill(self, now: float) -> None:
        """Filler video (the last picture, then black) and silence up to `now` minus the allowed lag,
        where no source sent any."""
        silent_for = now - self._last_source_video
        if silent_for > FILL_AFTER_SECONDS:
            at = now - self._start
            if at - self._last_video >= 1 / FILL_FPS:
                last = self._last_picture
                self._encode_video(
                    last if last is not None and silent_for < FREEZE_SECONDS else self._black, at
                )
        if now - self._last_source_audio > FILL_AFTER_SECONDS:
            self._silence_until(now - self._start - FILL_AFTER_SECONDS)

    def close(self) -> None:
        try:
            self._mux(self._video.encode(None))
            self._mux(self._audio.encode(None))
        finally:
            self._container.close()  # writes the last segment and EXT-X-ENDLIST
        log.info("composition HLS ended in %s", self._directory)

    def _scaled(self, frame: av.VideoFrame) -> av.VideoFrame:
        """The frame fitted into the output box with its aspect kept (black bars), in yuv420p."""
        key = (frame.width, frame.height, frame.format.name)
        if self._graph is None or self._graph_input != key:
            width, height = self._format.width, self._format.height
            graph = av.filter.Graph()
            graph.link_nodes(
                graph.add_buffer(
                    width=frame.width,
                    height=frame.height,
                    format=frame.format,
                    time_base=VIDEO_TIME_BASE,
                ),
                graph.add(
                    "scale", f"{width}:{height}:force_original_aspect_ratio=decrease:force_divisible_by=2"
                ),
                graph.add("pad", f"{width}:{height}:(ow-iw)/2:(oh-ih)/2"),
                graph.add("format", "yuv420p"),
                graph.add("buffersink"),
            ).configure()
            self._graph, self._graph_input = graph, key
        frame.pts = 0
        frame.time_base = VIDEO_TIME_BASE
        self._graph.push(frame)
        scaled = self._graph.pull()
        assert isinstance(scaled, av.VideoFrame)
        return scaled

    def _encode_video(self, frame: av.VideoFrame, at: float) -> None:
        # Timestamps must rise; a frame that would not (jitter at a source's switch) is skipped.
        if at <= self._last_video:
            return
        self._last_video = at
        frame.pts = round(at / VIDEO_TIME_BASE)
        frame.time_base = VIDEO_TIME_BASE
        # A keyframe starts every segment, so segments are as short as asked and each plays on its own.
        if at - self._last_key >= self._segment_seconds:
            frame.pict_type = PictureType.I
            self._last_key = at
        else:
            frame.pict_type = PictureType.NONE
        self._mux(self._video.encode(frame))

    def _queue_audio(self, frame: av.AudioFrame) -> None:
        """Queues fltp stereo samples at AUDIO_RATE and encodes every whole AAC frame they complete."""
        frame.pts = None
        self._fifo.write(frame)
        self._queued_samples += frame.samples
        while (chunk := self._fifo.read(AAC_FRAME_SAMPLES)) is not None:
            chunk.pts = self._encoded_samples
            chunk.time_base = Fraction(1, AUDIO_RATE)
            self._encoded_samples += chunk.samples
            self._mux(self._audio.encode(chunk))

    def _silence_until(self, seconds: float) -> None:
        missing = round(seconds * AUDIO_RATE) - self._queued_samples
        while missing > 0:
            samples = min(missing, AAC_FRAME_SAMPLES)
            silence = av.AudioFrame(format="fltp", layout="stereo", samples=samples)
            for plane in silence.planes:
                plane.update(bytes(plane.buffer_size))
            silence.sample_rate = AUDIO_RATE
            self._queue_audio(silence)
            missing -= samples

    def _mux(self, packets: list[av.Packet]) -> None:
        for packet in packets:
            self._container.mux(packet)
