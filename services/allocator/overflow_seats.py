"""Seats in a room's overflow tier (DESIGN.md §5): leases like the real-time ones, in a store of their own.

An overflow viewer plays the room's low-latency channel, so it holds no Stage and no IVS subscription:
its lease lives in a second lease store (its own Redis namespace), where the region's subscription
quota does not see it, under one pseudo-Stage per room with no capacity limit. It is still a lease, so
the viewer's heartbeats keep it, its leave ends it, it expires when the page goes away, and the room's
overflow audience is counted the same way as the real-time one.
"""

from __future__ import annotations

from services.allocator.placement import Candidate
from services.allocator.store import Assignment, Lease, LeaseStore

# The pseudo-Stage every overflow lease of a room is on.
OVERFLOW_SEAT = "overflow"
_UNLIMITED = 2**31 - 1
_SEAT = [Candidate(OVERFLOW_SEAT, 0, 0)]


class OverflowSeats:
    def __init__(self, store: LeaseStore) -> None:
        self._store = store

    async def take(self, room: str, user_id: str, lease_seconds: float, now: float) -> Assignment:
        """A seat for the viewer, or its own seat renewed (sticky); never refused."""
        assignment = await self._store.assign(
            room, user_id, _SEAT, (OVERFLOW_SEAT,), _UNLIMITED, _UNLIMITED, lease_seconds, now
        )
        assert assignment is not None, "an unlimited seat cannot be refused"
        return assignment

    async def renew(self, room: str, user_id: str, lease_seconds: float, now: float) -> Lease | None:
        return await self._store.renew(room, user_id, lease_seconds, now)

    async def release(self, room: str, user_id: str) -> bool:
        return await self._store.release(room, user_id)

    async def viewers(self, room: str, now: float) -> int:
        return (await self._store.counts(room, now)).get(OVERFLOW_SEAT, 0)

    async def viewers_by_room(self, now: float) -> dict[str, int]:
        counts = await self._store.rooms_counts(now)
        return {room: seats.get(OVERFLOW_SEAT, 0) for room, seats in counts.items()}

    async def reap(self, now: float) -> list[Lease]:
        return await self._store.reap(now)

    async def drop_room(self, room: str) -> int:
        return await self._store.drop_room(room)

    async def close(self) -> None:
        await self._store.close()
