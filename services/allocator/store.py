"""Viewer leases: the store interface every allocator store fits, and the embedded in-memory store."""

from __future__ import annotations

import heapq
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from services.allocator.placement import Candidate, choose_stage


@dataclass(frozen=True, slots=True)
class Lease:
    """A viewer's claim on a seat in one Stage of a room, live while `expires_at` (epoch s) > now."""

    room: str
    user_id: str
    stage_arn: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class Assignment:
    """The result of `assign`: `sticky` when the viewer kept the Stage its live lease was on."""

    lease: Lease
    sticky: bool


class LeaseStore(Protocol):
    """Where leases live. Each method is one atomic step, so that a Redis store can implement each
    with a single Lua script; all placement decisions go through `placement.choose_stage`.

    A lease is live while `expires_at > now`. Expired leases never count toward capacity and never
    renew, whether or not they have been reaped yet.
    """

    async def assign(
        self,
        room: str,
        user_id: str,
        candidates: Sequence[Candidate],
        keep_on: Collection[str],
        soft_capacity: int,
        hard_limit: int,
        lease_seconds: float,
        now: float,
        region_quota: int = 0,
    ) -> Assignment | None:
        """Places a viewer, atomically.

        If the viewer holds a live lease on a Stage in `keep_on` (Stages that still exist, which may
        include DRAINING ones that are not candidates), extends it to `now + lease_seconds` and
        returns it with sticky=True; the viewer is not counted twice. Otherwise drops any old lease
        and leases the Stage `choose_stage(candidates, live lease counts, ...)` picks. Returns None,
        changing nothing, when no candidate can take the viewer, or when the viewer is new and the
        store's leases in every room together reach `region_quota` (0: no such limit).
        """
        ...

    async def renew(self, room: str, user_id: str, lease_seconds: float, now: float) -> Lease | None:
        """Extends a live lease to `now + lease_seconds`; None if the viewer has no live lease."""
        ...

    async def release(self, room: str, user_id: str) -> bool:
        """Ends the viewer's lease; True if there was one. Idempotent."""
        ...

    async def counts(self, room: str, now: float) -> dict[str, int]:
        """Live leases per stage ARN in a room; Stages without live leases are absent."""
        ...

    async def rooms_counts(self, now: float) -> dict[str, dict[str, int]]:
        """`counts` for every room that has live leases."""
        ...

    async def reap(self, now: float) -> list[Lease]:
        """Removes expired leases and returns every lease that expired since the previous call,
        including those other calls removed on their way."""
        ...

    async def drop_stage(self, room: str, stage_arn: str) -> int:
        """Removes all leases on a deleted Stage; returns how many were removed."""
        ...

    async def drop_room(self, room: str) -> int:
        """Removes every lease of an ended room, on any Stage; returns how many were removed."""
        ...

    async def region_leases(self, now: float) -> int:
        """Leases in every room together: what the regional subscription quota counts. May include
        leases expired since their room was last touched (at most until the next `reap`)."""
        ...

    async def joins(self) -> dict[str, int]:
        """New placements (not sticky renewals) per room since the store began: the join rate's source."""
        ...

    async def ping(self) -> None:
        """Returns when the store answers; raises the backend's error otherwise."""
        ...

    async def close(self) -> None: ...


# Told True while the store answers and False during an outage: the allocator's readiness follows it.
HealthListener = Callable[[bool], Awaitable[None]]


class WatchedLeaseStore(LeaseStore, Protocol):
    """A lease store that also reports its own health: what the allocator is given."""

    async def watch(self, on_health: HealthListener) -> None:
        """Tells `on_health` the store's state first, then every change, for as long as it runs."""
        ...


# A live lease as the memory store keeps it: (stage ARN, expires_at). A plain tuple of a str and a float
# rather than a Lease: CPython stops tracking such tuples in its garbage collector, so the leases of a
# whole audience add nothing to a full collection's pause. As Lease objects, 100,000 of them made every
# full collection 12.6 ms longer (and the allocator makes one about every 25 % of new leases or renewals).
_Seat = tuple[str, float]


@dataclass
class _Room:
    seats: dict[str, _Seat] = field(default_factory=dict)
    # stage ARN -> user ids, so a count is len() and drop_stage needs no scan over the room.
    viewers: dict[str, set[str]] = field(default_factory=dict)
    # (expires_at, user_id) pushed on every create and renew; an entry is stale when the viewer's lease
    # now has another expiry or is gone, and is skipped when popped. Pushing instead of updating in
    # place keeps renew O(log n); the heap is rebuilt when stale entries outnumber live ones.
    expiries: list[tuple[float, str]] = field(default_factory=list)

    def lease(self, room: str, user_id: str) -> Lease | None:
        seat = self.seats.get(user_id)
        return None if seat is None else Lease(room, user_id, seat[0], seat[1])


class MemoryLeaseStore:
    """The embedded, single-process `LeaseStore`.

    Every method is `async` for the interface's sake but never awaits, so under asyncio each call runs
    to completion without interleaving: that is what makes a decision (read counts, choose, write) atomic.
    Per-Stage viewer sets keep `assign` O(candidates); expired leases are removed lazily, in expiry
    order, by every call that reads or changes a room, so they never count toward capacity.
    """

    def __init__(self, max_unreported_expired: int = 65_536) -> None:
        self._rooms: dict[str, _Room] = {}
        # Leases removed by lazy expiry wait here for the next `reap`; bounded so that a process that
        # never reaps cannot grow without limit (the oldest are then dropped unreported).
        self._expired: deque[Lease] = deque(maxlen=max_unreported_expired)
        self._joins: Counter[str] = Counter()
        # Leases in every room together, kept by _put and _remove.
        self._region_leases = 0

    async def assign(
        self,
        room: str,
        user_id: str,
        candidates: Sequence[Candidate],
        keep_on: Collection[str],
        soft_capacity: int,
        hard_limit: int,
        lease_seconds: float,
        now: float,
        region_quota: int = 0,
    ) -> Assignment | None:
        state = self._rooms.get(room)
        if state is None:
            state = _Room()
        else:
            self._expire(room, state, now)
        current = state.lease(room, user_id)
        if current is not None and current.stage_arn in keep_on:
            renewed = replace(current, expires_at=now + lease_seconds)
            self._put(state, renewed)
            return Assignment(renewed, sticky=True)
        # A new viewer is one more subscription in the region; one moving Stages is not. Only at the
        # quota are the other rooms' expired leases swept out, so the usual join stays O(candidates).
        at_quota = current is None and region_quota and self._region_leases >= region_quota
        if at_quota and await self.region_leases(now) >= region_quota:
            return None

        leased = {c.stage_arn: len(state.viewers.get(c.stage_arn, ())) for c in candidates}
        if current is not None and current.stage_arn in leased:
            # The old lease is about to go, so it must not weigh on the choice of its replacement.
            leased[current.stage_arn] -= 1
        chosen = choose_stage(candidates, leased, soft_capacity, hard_limit)
        if chosen is None:
            return None
        if current is not None:
            self._remove(state, current)
        lease = Lease(room, user_id, chosen.stage_arn, now + lease_seconds)
        self._put(state, lease)
        self._rooms[room] = state
        self._joins[room] += 1
        return Assignment(lease, sticky=False)

    async def renew(self, room: str, user_id: str, lease_seconds: float, now: float) -> Lease | None:
        state = self._rooms.get(room)
        if state is None:
            return None
        current = state.lease(room, user_id)
        if current is None or current.expires_at <= now:
            return None
        renewed = replace(current, expires_at=now + lease_seconds)
        self._put(state, renewed)
        return renewed

    async def release(self, room: str, user_id: str) -> bool:
        state = self._rooms.get(room)
        if state is None:
            return False
        current = state.lease(room, user_id)
        if current is None:
            return False
        self._remove(state, current)
        self._forget_if_empty(room, state)
        return True

    async def counts(self, room: str, now: float) -> dict[str, int]:
        state = self._rooms.get(room)
        if state is None:
            return {}
        self._expire(room, state, now)
        return {arn: len(users) for arn, users in state.viewers.items()}

    async def rooms_counts(self, now: float) -> dict[str, dict[str, int]]:
        for room, state in list(self._rooms.items()):
            self._expire(room, state, now)
        return {
            room: {arn: len(users) for arn, users in state.viewers.items()}
            for room, state in self._rooms.items()
        }

    async def reap(self, now: float) -> list[Lease]:
        for room, state in list(self._rooms.items()):
            self._expire(room, state, now)
        reaped = list(self._expired)
        self._expired.clear()
        return reaped

    async def drop_stage(self, room: str, stage_arn: str) -> int:
        state = self._rooms.get(room)
        if state is None:
            return 0
        users = state.viewers.pop(stage_arn, set())
        for user_id in users:
            del state.seats[user_id]
        self._region_leases -= len(users)
        self._forget_if_empty(room, state)
        return len(users)

    async def drop_room(self, room: str) -> int:
        state = self._rooms.pop(room, None)
        dropped = len(state.seats) if state else 0
        self._region_leases -= dropped
        return dropped

    async def region_leases(self, now: float) -> int:
        for room, state in list(self._rooms.items()):
            self._expire(room, state, now)
        return self._region_leases

    async def joins(self) -> dict[str, int]:
        return dict(self._joins)

    async def ping(self) -> None:
        """Always answers: it lives in this process."""

    async def watch(self, on_health: HealthListener) -> None:
        """Healthy from the start and for good: it lives in this process."""
        await on_health(True)

    async def close(self) -> None:
        """Nothing to release: the leases die with the process."""

    def _put(self, state: _Room, lease: Lease) -> None:
        if lease.user_id not in state.seats:
            self._region_leases += 1
        state.seats[lease.user_id] = (lease.stage_arn, lease.expires_at)
        state.viewers.setdefault(lease.stage_arn, set()).add(lease.user_id)
        heapq.heappush(state.expiries, (lease.expires_at, lease.user_id))
        if len(state.expiries) > 2 * len(state.seats) + 64:
            state.expiries = [(expires_at, user) for user, (_, expires_at) in state.seats.items()]
            heapq.heapify(state.expiries)

    def _remove(self, state: _Room, lease: Lease) -> None:
        self._region_leases -= 1
        del state.seats[lease.user_id]
        users = state.viewers[lease.stage_arn]
        users.discard(lease.user_id)
        if not users:
            del state.viewers[lease.stage_arn]

    def _expire(self, room: str, state: _Room, now: float) -> None:
        heap = state.expiries
        while heap and heap[0][0] <= now:
            expires_at, user_id = heapq.heappop(heap)
            seat = state.seats.get(user_id)
            if seat is not None and seat[1] == expires_at:
                lease = Lease(room, user_id, *seat)
                self._remove(state, lease)
                self._expired.append(lease)
        self._forget_if_empty(room, state)

    def _forget_if_empty(self, room: str, state: _Room) -> None:
        if not state.seats:
            self._rooms.pop(room, None)
