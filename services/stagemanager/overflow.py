"""The overflow tier's lifecycle (DESIGN.md §5): per live room, a low-latency IVS channel and a
server-side composition of the room's origin into it, so viewers past the real-time ceiling can watch.

With FANOUT_OVERFLOW=auto, a room that goes live (its broadcaster publishes on an origin) gets:

- a LOW latency channel (`ivs` CreateChannel), named and tagged after the cluster and the room;
- the cluster's encoder configuration (CreateEncoderConfiguration once, tagged, shared by every room);
- a composition of a publishing origin into the channel (StartComposition), polled with GetComposition
  until ACTIVE or FAILED, then checked every `check_seconds`.

A composition stops on its own once its Stage has had no publisher for a while (60 s in AWS); it is
started again when the room is live again, into the same channel. A refusal (a quota, a missing
permission) or a FAILED composition is recorded on the room with its reason and tried again only after
`retry_seconds`, never in a loop. When the room ends, its compositions are stopped and its channel
deleted before its Stages (RoomManager._delete_room calls `end_room`), retrying until IVS answers.

Nothing is trusted to memory: before making a channel or a composition, the ones IVS already has for the
room (found by name, tags and Stage) are adopted, so a lost answer or a restart never makes a second
one; `recover` adopts what the cluster has in IVS and deletes the channels of rooms that no longer exist.
Only the leader runs this (server.py's act); every call that changes IVS goes through a fenced caller.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from services.common.errors import FanoutError, NotFound, Unavailable
from services.common.stage_tags import TAG_CLUSTER, TAG_ROLE, TAG_ROOM
from services.stagemanager.channels import ChannelApi, IvsChannel
from services.stagemanager.inventory import Inventory
from services.stagemanager.ivs import CompositionApi, IvsComposition, OverflowRefused
from services.stagemanager.model import EXISTING_STATES, RoomRecord, StageRecord

if TYPE_CHECKING:
    # Only for the types: metrics.py imports this module's states, the autoscaler the room manager.
    from services.stagemanager.autoscaler import OccupancySource, RoomLoad
    from services.stagemanager.metrics import StageManagerMetrics

log = logging.getLogger(__name__)

T = TypeVar("T")


class Attempt(Protocol):
    async def __call__(self, what: str, call: Callable[[], Awaitable[T]], default: T | None = None) -> T: ...


AUTO = "auto"
OFF = "off"
MODES = (AUTO, OFF)

STARTING = "STARTING"
ACTIVE = "ACTIVE"
STOPPING = "STOPPING"
STOPPED = "STOPPED"
FAILED = "FAILED"
RUNNING = frozenset({STARTING, ACTIVE, STOPPING})
COMPOSITION_STATES = (STARTING, ACTIVE, STOPPING, STOPPED, FAILED)
OVERFLOW_ROLE = "overflow"
# What the composition sends to the channel: IVS's defaults (720p30 at 2.5 Mbps), the Web SDK's top
# simulcast layer, within a STANDARD channel's input limits.
VIDEO = {"width": 1280, "height": 720, "framerate": 30, "bitrate": 2_500_000}


@dataclass(frozen=True)
class OverflowSettings:
    mode: str = OFF
    # While a composition is STARTING or STOPPING, and while waiting for one to stop at a room's end.
    poll_seconds: float = 1.0
    # How often an ACTIVE (or STOPPED) composition is checked.
    check_seconds: float = 10.0
    # After a refusal or a FAILED composition: the next attempt, never sooner.
    retry_seconds: float = 60.0
    # After a call that IVS did not answer (an outage, a throttle past our retries).
    error_retry_seconds: float = 5.0
    # At a room's end: how long to wait for its compositions to stop before deleting the channel anyway
    # (DeleteChannel refuses a live channel: it is retried until the channel is idle).
    stop_wait_seconds: float = 30.0
    # When a live room gets its overflow tier: 0, as soon as it goes live; otherwise once its viewers
    # reach this fraction of its ceiling (a composition takes seconds to start: before the ceiling).
    start_at: float = 0.0
    # With start_at > 0: a room below it with nobody in the overflow tier for this long has its
    # composition stopped and its channel deleted (it gets new ones when it climbs again).
    idle_seconds: float = 600.0


class OverflowManager:
    def __init__(
        self,
        inventory: Inventory,
        channels: ChannelApi,
        compositions: CompositionApi,
        settings: OverflowSettings,
        cluster_id: str,
        metrics: StageManagerMetrics,
        occupancy: OccupancySource | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inventory = inventory
        # The rooms' viewers and ceilings, for start_at > 0 (None: every live room gets the tier).
        self._occupancy = occupancy
        # Per room, with start_at > 0: since when it has had an overflow tier it does not need.
        self._idle_since: dict[str, float] = {}
        self._channels = channels
        self._compositions = compositions
        self._settings = settings
        self._cluster = cluster_id
        self._metrics = metrics
        self._clock = clock
        # Per room: the composition this manager started and when it called StartComposition, until
        # it is first seen ACTIVE (the start latency's sample) or fails or stops first (no sample).
        self._starting: dict[str, tuple[str, float]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # Per room: no IVS call for it before this time (polling cadence, retry delays).
        self._not_before: dict[str, float] = {}
        self._encoder_arn = ""
        self._encoder_lock = asyncio.Lock()
        self._failing = False
        metrics.overflow_enabled.set(1 if self.enabled else 0)

    @property
    def enabled(self) -> bool:
        return self._settings.mode == AUTO

    def _lock(self, room: str) -> asyncio.Lock:
        return self._locks.setdefault(room, asyncio.Lock())

    def _room_tags(self, room: str) -> dict[str, str]:
        return {TAG_CLUSTER: self._cluster, TAG_ROOM: room}

    def _channel_name(self, room: str) -> str:
        return f"fanout-{self._cluster}-{room}"[:128]

    def _set(self, room: RoomRecord, **changes: str) -> None:
        self._inventory.set_room_overflow(room.room, **changes)

    # --- the leader's loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """Recovers what the cluster has in IVS, then keeps every live room's overflow tier going."""
        if not self.enabled:
            return
        await self._until_done("overflow recovery", self.recover)
        while True:
            try:
                await self.run_pass()
            except Exception:
                log.exception("overflow pass failed")
            await asyncio.sleep(self._settings.poll_seconds)

    async def run_pass(self) -> None:
        failed = False
        demand = await self._demand()
        for room in self._inventory.rooms():
            try:
                wanted = self._wanted(room, demand)
                if wanted is False:
                    await self._retire_when_idle(room)
                    continue
                self._idle_since.pop(room.room, None)
                if wanted or _has_tier(room):
                    await self._check(room)
            except FanoutError as error:
                failed = True
                self._not_before[room.room] = self._clock() + self._settings.error_retry_seconds
                if not self._failing:
                    log.warning("room %s: overflow check failed: %s", room.room, error.message)
        if self._failing and not failed:
            log.info("overflow checks succeed again")
        self._failing = failed
        known = {room.room for room in self._inventory.rooms()}
        for room_id in set(self._not_before) - known:
            del self._not_before[room_id]
        for room_id in set(self._starting) - known:
            del self._starting[room_id]
        for room_id in set(self._idle_since) - known:
            del self._idle_since[room_id]

    # --- when a room needs the tier (start_at > 0) ----------------------------------------------------

    async def _demand(self) -> dict[str, RoomLoad] | None:
        """The rooms' loads when the tier follows demand; None when every live room gets it, or while
        the allocator does not answer (then nothing is started or retired on a guess)."""
        if self._settings.start_at <= 0 or self._occupancy is None:
            return None
        try:
            return await self._occupancy.fetch()
        except FanoutError as error:
            log.warning("overflow demand unknown: %s", error.message)
            return None

    def _wanted(self, room: RoomRecord, demand: dict[str, RoomLoad] | None) -> bool | None:
        """True: the room needs its overflow tier; False: it does not; None: unknown (keep what is,
        start nothing new) or no demand rule (every live room: True)."""
        if self._settings.start_at <= 0:
            return True
        if demand is None:
            return None
        load = demand.get(room.room)
        if load is None:
            return False
        viewers = sum(load.viewers.values())
        return load.overflow_viewers > 0 or (
            load.ceiling > 0 and viewers >= self._settings.start_at * load.ceiling
        )

    async def _retire_when_idle(self, room: RoomRecord) -> None:
        """A tier the room has not needed for `idle_seconds` goes: composition stopped, channel deleted."""
        if not _has_tier(room):
            self._idle_since.pop(room.room, None)
            return
        now = self._clock()
        since = self._idle_since.setdefault(room.room, now)
        if now - since < self._settings.idle_seconds or room.ending:
            return
        async with self._lock(room.room):
            if room.ending or self._inventory.room(room.room) is not room:
                return
            log.info("room %s: overflow tier not needed for %.0f s; removing it", room.room, now - since)
            await self._teardown(room, self._once)
        self._idle_since.pop(room.room, None)

    async def _check(self, room: RoomRecord) -> None:
        if room.ending or self._clock() < self._not_before.get(room.room, 0.0):
            return
        async with self._lock(room.room):
            if room.ending or self._inventory.room(room.room) is not room:
                return
            if _composing(room):
                await self._refresh(room)
            origin = _publishing_origin(room)
            if origin is None or _composing(room) or self._clock() < self._not_before.get(room.room, 0.0):
                return
            # No overflow yet, or it stopped or failed (a failure waited out `retry_seconds` above).
            await self._start(room, origin)

    async def _refresh(self, room: RoomRecord) -> None:
        try:
            composition = await self._compositions.get(room.overflow_composition_arn)
        except NotFound:
            # IVS deletes ended compositions after a few minutes.
            self._starting.pop(room.room, None)
            self._set(room, state=STOPPED, composition_arn="", error="")
            return
        self._record(room, composition)

    def _record(self, room: RoomRecord, composition: IvsComposition) -> None:
        started = self._starting.get(room.room)
        if started is not None and (started[0] != composition.arn or composition.state != STARTING):
            del self._starting[room.room]
            if started[0] == composition.arn and composition.state == ACTIVE:
                self._metrics.overflow_start.observe(max(0.0, self._clock() - started[1]))
        if composition.state == FAILED:
            if room.overflow_state != FAILED:
                log.warning("room %s: overflow composition %s FAILED", room.room, composition.arn)
                self._metrics.overflow_failures.labels(room.room, "failed").inc()
            error = "the composition failed: IVS could not broadcast to the channel"
            self._set(room, state=FAILED, composition_arn=composition.arn, error=error)
            self._not_before[room.room] = self._clock() + self._settings.retry_seconds
            return
        if composition.state != room.overflow_state:
            log.info("room %s: overflow composition %s %s", room.room, composition.arn, composition.state)
        self._set(room, state=composition.state, composition_arn=composition.arn, error="")
        pause = self._settings.check_seconds if composition.state == ACTIVE else self._settings.poll_seconds
        self._not_before[room.room] = self._clock() + pause

    async def _start(self, room: RoomRecord, origin: StageRecord) -> None:
        before = room.overflow_state
        self._set(room, state=STARTING, error="")
        try:
            await self._ensure_channel(room)
            encoder = await self._encoder_configuration()
            tags = self._room_tags(room.room)
            # One of ours already composing this origin (a StartComposition whose answer was lost)?
            composition = next(
                (
                    c
                    for c in await self._compositions.list_on_stage(origin.arn)
                    if c.running and _tagged(c.tags, tags)
                ),
                None,
            )
            if composition is None:
                called_at = self._clock()
                composition = await self._compositions.start(
                    origin.arn, room.overflow_channel_arn, encoder, tags
                )
                self._starting[room.room] = (composition.arn, called_at)
                log.info(
                    "room %s: composing Stage %d into channel %s (%s)",
                    room.room,
                    origin.index,
                    room.overflow_channel_arn,
                    composition.arn,
                )
        except OverflowRefused as error:
            log.error("room %s: no overflow tier: %s", room.room, error.message)
            self._metrics.overflow_failures.labels(room.room, "refused").inc()
            self._set(room, state=FAILED, error=error.message)
            self._not_before[room.room] = self._clock() + self._settings.retry_seconds
            return
        except NotFound as error:
            # The channel was deleted behind our back (or the origin meanwhile): made again next time.
            self._set(room, state=STOPPED, channel_arn="", playback_url="", error=error.message)
            raise Unavailable(error.message, code="overflow_retry") from error
        except Unavailable as error:
            self._set(room, state=before, error=error.message)
            raise
        self._record(room, composition)

    async def _ensure_channel(self, room: RoomRecord) -> None:
        if room.overflow_channel_arn and room.overflow_playback_url:
            return
        tags = self._room_tags(room.room)
        name = self._channel_name(room.room)
        found = await self._channels.list_channels(tags, name=name)
        if found:
            channel = found[0]
            if not channel.playback_url:
                channel = await self._channels.get_channel(channel.arn)
        else:
            channel = await self._channels.create_channel(name, tags)
            log.info("room %s: overflow channel %s created", room.room, channel.arn)
        self._set(room, channel_arn=channel.arn, playback_url=channel.playback_url)

    async def _encoder_configuration(self) -> str:
        async with self._encoder_lock:
            if not self._encoder_arn:
                tags = {TAG_CLUSTER: self._cluster, TAG_ROLE: OVERFLOW_ROLE}
                arn = await self._compositions.find_encoder_configuration(tags)
                if arn is None:
                    arn = await self._compositions.create_encoder_configuration(
                        f"fanout-{self._cluster}-overflow", VIDEO, tags
                    )
                    log.info("overflow encoder configuration %s created", arn)
                self._encoder_arn = arn
            return self._encoder_arn

    # --- a room's end -------------------------------------------------------------------------------

    async def end_room(self, room: RoomRecord) -> None:
        """Stops the room's compositions and deletes its channel, retrying until IVS answers: both are
        found in IVS too (tags, name, Stage), not only as recorded, so nothing is left behind."""
        if not self.enabled and not room.overflow_channel_arn:
            return
        async with self._lock(room.room):
            await self._teardown(room, self._until_done)

    async def _teardown(self, room: RoomRecord, attempt: Attempt) -> None:
        """Stops the room's compositions and deletes its channel, each call made through `attempt`
        (until IVS answers at a room's end; once, raising, when an idle tier is removed)."""
        self._starting.pop(room.room, None)
        tags = self._room_tags(room.room)
        compositions = {room.overflow_composition_arn} - {""}
        # Every origin, DELETING ones too: the ending marked them all before calling this.
        for origin in room.origins():
            if origin.arn:
                found: list[IvsComposition] = await attempt(
                    f"ListCompositions of {origin.arn}",
                    functools.partial(self._compositions.list_on_stage, origin.arn),
                    default=[],
                )
                compositions |= {c.arn for c in found if c.running and _tagged(c.tags, tags)}
        for arn in sorted(compositions):
            await attempt(f"StopComposition {arn}", functools.partial(self._compositions.stop, arn))
        if compositions:
            self._set(room, state=STOPPING)
            await self._wait_stopped(compositions)
        channels = {room.overflow_channel_arn} - {""}
        found_channels: list[IvsChannel] = await attempt(
            "ListChannels",
            lambda: self._channels.list_channels(tags, name=self._channel_name(room.room)),
            default=[],
        )
        channels |= {c.arn for c in found_channels}
        for arn in sorted(channels):
            await attempt(f"DeleteChannel {arn}", functools.partial(self._channels.delete_channel, arn))
            log.info("room %s: overflow channel %s deleted", room.room, arn)
        self._set(room, state="", channel_arn="", playback_url="", composition_arn="", error="")

    async def _wait_stopped(self, arns: set[str]) -> None:
        deadline = self._clock() + self._settings.stop_wait_seconds
        waiting = set(arns)
        while waiting and self._clock() < deadline:
            for arn in sorted(waiting):
                try:
                    if not (await self._compositions.get(arn)).running:
                        waiting.discard(arn)
                except NotFound:
                    waiting.discard(arn)
                except FanoutError as error:
                    log.warning("GetComposition %s failed: %s", arn, error.message)
            if waiting:
                await asyncio.sleep(self._settings.poll_seconds)

    @staticmethod
    async def _once(what: str, call: Callable[[], Awaitable[T]], default: T | None = None) -> T:
        """One attempt: an error goes to the caller (the next pass tries again)."""
        return await call()

    async def _until_done(self, what: str, call: Callable[[], Awaitable[T]], default: T | None = None) -> T:
        """Retries `call` until IVS answers; a refusal (no permission, say) is logged and gives `default`."""
        delay = 0.5
        while True:
            try:
                return await call()
            except OverflowRefused as error:
                log.error("%s refused: %s", what, error.message)
                return default  # type: ignore[return-value]
            except Unavailable as error:
                log.warning("%s failed: %s; retrying in %.1f s", what, error.message, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    # --- after a restart or a takeover ----------------------------------------------------------------

    async def recover(self) -> None:
        """Adopts the cluster's channels and compositions in IVS into the inventory (one of each per
        room: extra ones are stopped and deleted) and deletes the channels of rooms that are gone.
        Rooms being ended are left to their ending (end_room finds their channels itself)."""
        by_room: dict[str, list[IvsChannel]] = {}
        for channel in await self._channels.list_channels({TAG_CLUSTER: self._cluster}):
            by_room.setdefault(channel.tags.get(TAG_ROOM, ""), []).append(channel)
        adopted = 0
        for room in self._inventory.rooms():
            channels = by_room.pop(room.room, [])
            if room.ending:
                continue
            async with self._lock(room.room):
                adopted += await self._adopt(room, channels)
        orphans = [channel for channels in by_room.values() for channel in channels]
        for channel in orphans:
            log.warning("overflow channel %s belongs to no room; deleting it", channel.arn)
            await self._until_done(
                f"DeleteChannel {channel.arn}", functools.partial(self._channels.delete_channel, channel.arn)
            )
        log.info(
            "overflow recovered: %d composition(s) adopted, %d channel(s) deleted", adopted, len(orphans)
        )

    async def _adopt(self, room: RoomRecord, channels: list[IvsChannel]) -> int:
        tags = self._room_tags(room.room)
        running: list[IvsComposition] = []
        for origin in room.origins():
            if origin.arn and origin.state in EXISTING_STATES:
                running += [
                    c
                    for c in await self._compositions.list_on_stage(origin.arn)
                    if c.running and _tagged(c.tags, tags)
                ]
        # The recorded composition first, then the newest (ListCompositions lists newest first).
        running.sort(key=lambda c: c.arn != room.overflow_composition_arn)
        keep, extra = (running[0], running[1:]) if running else (None, [])
        for composition in extra:
            log.warning("room %s: stopping a second overflow composition %s", room.room, composition.arn)
            await self._compositions.stop(composition.arn)
        channel = next((c for c in channels if c.arn == room.overflow_channel_arn), None)
        if keep is not None:
            described = await self._compositions.get(keep.arn)
            channel = next((c for c in channels if c.arn in described.channel_arns), channel)
        channel = channel or (channels[0] if channels else None)
        for other in channels:
            if channel is not None and other.arn != channel.arn:
                log.warning("room %s: deleting a second overflow channel %s", room.room, other.arn)
                await self._channels.delete_channel(other.arn)
        if channel is not None and not channel.playback_url:
            channel = await self._channels.get_channel(channel.arn)
        self._set(
            room,
            channel_arn=channel.arn if channel else "",
            playback_url=channel.playback_url if channel else "",
            composition_arn=keep.arn if keep else "",
            state=keep.state if keep else (STOPPED if channel else ""),
            error="",
        )
        return 1 if keep else 0


def _tagged(tags: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    return all(tags.get(k) == v for k, v in wanted.items())


def _has_tier(room: RoomRecord) -> bool:
    """The room has an overflow channel or composition (in any state) to keep up or to remove."""
    return bool(room.overflow_state or room.overflow_channel_arn or room.overflow_composition_arn)


def _composing(room: RoomRecord) -> bool:
    """A composition of the room's may be running: only GetComposition can say it stopped."""
    return bool(room.overflow_composition_arn) and room.overflow_state in RUNNING


def _publishing_origin(room: RoomRecord) -> StageRecord | None:
    """The origin to compose: the lowest-indexed one the broadcaster publishes on."""
    return next((s for s in room.origins() if s.arn and s.publishing and s.state in EXISTING_STATES), None)
