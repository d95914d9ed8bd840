"""A lease store whose outages are answers, not crashes: bounded calls, fast 503s, one log line.

Wraps any `LeaseStore`. Each call is bounded by `call_timeout` and a failed or late call answers
`Unavailable` (503, Retry-After). Whether the backend is down is the probe's call, not a request's:
a request can be late because this process is overloaded (waiting for a pooled connection), which
must not take the allocator out of service. A failed call only wakes the probe (`watch`, on the
store's own probe connection); when the probe fails too, the outage begins: it is logged once,
`on_health` hears False (readiness), and every call fails at once without touching the backend, so a
frozen Redis costs a viewer milliseconds, not the gateway's whole deadline. The probe ends the
outage by itself when the backend answers again.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TypeVar

from services.allocator.placement import Candidate
from services.allocator.store import Assignment, HealthListener, Lease, LeaseStore
from services.common.errors import Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")


class GuardedLeaseStore:
    """`LeaseStore` over another one. `failures` are the backend's errors that mean it may be
    unreachable (a connection refused or lost, a timeout), not those that mean a bug (a script error)."""

    def __init__(
        self,
        inner: LeaseStore,
        failures: tuple[type[Exception], ...],
        call_timeout: float,
        probe_interval: float,
        name: str = "lease store",
    ) -> None:
        self._inner = inner
        self._failures: tuple[type[Exception], ...] = (*failures, OSError, TimeoutError)
        self._call_timeout = call_timeout
        self._probe_interval = probe_interval
        self._name = name
        self._down = False
        self._retry_after = max(1, math.ceil(probe_interval * 2))
        self._probe_now = asyncio.Event()

    def _unavailable(self) -> Unavailable:
        return Unavailable(
            f"the {self._name} is unavailable; try again shortly",
            code="store_unavailable",
            retry_after=self._retry_after,
        )

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        if self._down:
            raise self._unavailable()
        try:
            async with asyncio.timeout(self._call_timeout):
                return await call()
        except self._failures:
            # Logged once, by the probe, if the backend is really down; never a line per request.
            self._probe_now.set()
            raise self._unavailable() from None

    async def watch(self, on_health: HealthListener) -> None:
        """Probes the backend forever; tells `on_health` the state first and then every change."""
        reported: bool | None = None
        while True:
            self._probe_now.clear()
            try:
                async with asyncio.timeout(self._call_timeout):
                    await self._inner.ping()
            except self._failures as error:
                if not self._down:
                    # The error's class and text, never a traceback.
                    log.warning("%s unreachable (%s: %s); answering 503 until it answers", self._name,
                                type(error).__name__, error or "timed out")  # fmt: skip
                    self._down = True
            else:
                if self._down:
                    log.info("%s reachable again", self._name)
                    self._down = False
            healthy = not self._down
            if healthy != reported:
                reported = healthy
                await on_health(healthy)
            # A failed call wakes the probe at once, so readiness follows the first failed request.
            try:
                async with asyncio.timeout(self._probe_interval):
                    await self._probe_now.wait()
            except TimeoutError:
                pass

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
        return await self._call(
            lambda: self._inner.assign(
                room,
                user_id,
                candidates,
                keep_on,
                soft_capacity,
                hard_limit,
                lease_seconds,
                now,
                region_quota,
            )
        )

    async def renew(self, room: str, user_id: str, lease_seconds: float, now: float) -> Lease | None:
        return await self._call(lambda: self._inner.renew(room, user_id, lease_seconds, now))

    async def release(self, room: str, user_id: str) -> bool:
        return await self._call(lambda: self._inner.release(room, user_id))

    async def counts(self, room: str, now: float) -> dict[str, int]:
        return await self._call(lambda: self._inner.counts(room, now))

    async def rooms_counts(self, now: float) -> dict[str, dict[str, int]]:
        return await self._call(lambda: self._inner.rooms_counts(now))

    async def reap(self, now: float) -> list[Lease]:
        return await self._call(lambda: self._inner.reap(now))

    async def drop_stage(self, room: str, stage_arn: str) -> int:
        return await self._call(lambda: self._inner.drop_stage(room, stage_arn))

    async def drop_room(self, room: str) -> int:
        return await self._call(lambda: self._inner.drop_room(room))

    async def region_leases(self, now: float) -> int:
        return await self._call(lambda: self._inner.region_leases(now))

    async def joins(self) -> dict[str, int]:
        return await self._call(self._inner.joins)

    async def ping(self) -> None:
        await self._call(self._inner.ping)

    async def close(self) -> None:
        await self._inner.close()
