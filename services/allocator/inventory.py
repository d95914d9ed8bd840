"""The allocator's copy of the stage inventory, kept current by the stage manager's WatchRoom stream."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class StageView:
    arn: str
    room: str
    index: int
    state: str  # PROVISIONING, STANDBY, LIVE, DRAINING, DELETING, FAILED
    events_url: str
    whip_url: str
    # "origin" (the page publishes to it) or "replica" (IVS replicates the broadcaster into it).
    role: str = "origin"


REPLICA_ROLE = "replica"
# A Stage in these states exists in IVS and may keep the viewers it has.
KEEPS_VIEWERS = frozenset({"STANDBY", "LIVE", "DRAINING"})


class StageInventory:
    """Rooms and Stages by ARN, plus the stage manager revision they reflect."""

    def __init__(self) -> None:
        self._rooms: dict[str, dict[str, StageView]] = {}
        # Rooms being ended: their Stages are going and no viewer is placed there any more.
        self._ending: set[str] = set()
        # Room -> the playback URL of its overflow tier while that tier takes viewers (DESIGN.md §5).
        self._overflow: dict[str, str] = {}
        self._revision = 0
        # Replaced on every change: waiters hold the old one, which is set (a broadcast with no task).
        self._changed = asyncio.Event()

    @property
    def revision(self) -> int:
        return self._revision

    def has_room(self, room: str) -> bool:
        return room in self._rooms

    def is_ending(self, room: str) -> bool:
        return room in self._ending

    def overflow_url(self, room: str) -> str:
        """Where the room's overflow tier plays, while it takes viewers; "" when it has none."""
        return self._overflow.get(room, "")

    def stages(self, room: str) -> list[StageView]:
        return sorted(self._rooms.get(room, {}).values(), key=lambda stage: stage.index)

    def count(self, room: str | None = None) -> int:
        """Stages known in `room`, or in every room: no copy, no sort."""
        if room is not None:
            return len(self._rooms.get(room, {}))
        return sum(len(stages) for stages in self._rooms.values())

    def rooms(self) -> list[str]:
        return list(self._rooms)

    def eligible(self, room: str) -> list[StageView]:
        """Where new viewers go: LIVE Stages while the room has any, otherwise STANDBY ones."""
        stages = self.stages(room)
        live = [stage for stage in stages if stage.state == "LIVE"]
        return live or [stage for stage in stages if stage.state == "STANDBY"]

    def replace_all(
        self,
        rooms: Iterable[str],
        ending: Iterable[str],
        stages: Iterable[StageView],
        revision: int,
        overflow: Mapping[str, str] | None = None,
    ) -> None:
        """Applies a complete snapshot: what it lacks does not exist."""
        self._rooms = {room: {} for room in rooms}
        self._ending = set(ending) & set(self._rooms)
        self._overflow = {room: url for room, url in (overflow or {}).items() if url and room in self._rooms}
        for stage in stages:
            if stage.arn:
                self._rooms.setdefault(stage.room, {})[stage.arn] = stage
        self._set_revision(revision)

    def merge(
        self,
        rooms: Iterable[str],
        ending: Iterable[str],
        stages: Iterable[StageView],
        revision: int,
        overflow: Mapping[str, str] | None = None,
    ) -> None:
        """Applies a partial snapshot: what it holds is true, what it lacks may still exist."""
        for room in rooms:
            self._rooms.setdefault(room, {})
        self._ending |= set(ending)
        for room, url in (overflow or {}).items():
            self._set_overflow(room, url)
        for stage in stages:
            self.put_stage(stage, revision)
        self._set_revision(revision)

    def put_room(self, room: str, revision: int, ending: bool = False, overflow_url: str = "") -> None:
        self._rooms.setdefault(room, {})
        if ending:
            self._ending.add(room)
        else:
            self._ending.discard(room)
        self._set_overflow(room, overflow_url)
        self._set_revision(revision)

    def _set_overflow(self, room: str, url: str) -> None:
        if url:
            self._overflow[room] = url
        else:
            self._overflow.pop(room, None)

    def put_stage(self, stage: StageView, revision: int) -> None:
        # A Stage has no ARN until IVS created it; until then there is nothing to place or sign for.
        if stage.arn:
            self._rooms.setdefault(stage.room, {})[stage.arn] = stage
        self._set_revision(revision)

    def remove_stage(self, room: str, arn: str, revision: int) -> StageView | None:
        removed = self._rooms.get(room, {}).pop(arn, None)
        self._set_revision(revision)
        return removed

    def remove_room(self, room: str, revision: int) -> list[StageView]:
        removed = list(self._rooms.pop(room, {}).values())
        self._ending.discard(room)
        self._overflow.pop(room, None)
        self._set_revision(revision)
        return removed

    def _set_revision(self, revision: int) -> None:
        self._revision = max(self._revision, revision)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_for_revision(self, revision: int, within: float) -> bool:
        """True once the inventory reflects `revision` (or later); False after `within` seconds."""
        try:
            async with asyncio.timeout(within):
                while self._revision < revision:
                    await self._changed.wait()
        except TimeoutError:
            return False
        return True
