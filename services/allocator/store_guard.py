"""A lease store whose outages are answers, not crashes: bounded calls, fast 503s, one log line.

Wraps any `LeaseStore`. Each call is bounded by `call_timeout`; a failure or a timeout starts an
outage: it is logged once, the `on_health` callback hears False (readiness), and every call fails at
once with `Unavailable` (503, Retry-After) without touching the backend, so a frozen Redis costs a
viewer milliseconds, not the gateway's whole deadline. `watch` probes the backend and ends the
outage by itself when it answers again.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TypeVar

from services.allocator.placement import Candidate
from services.allocator.store import Assignment, Lease, LeaseStore
from services.common.errors import Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")


class GuardedLeaseStore:
    """`LeaseStore` over another one. `failures` are the backend's errors that mean it is unreachable
    (a connection refused or lost, a timeout), not those that mean a bug (a script error)."""

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
        self._health_changed = asyncio.Event()

    @property
    def available(self) -> bool:
        return not self._down

    def _unavailable(self) -> Unavailable:
        return Unavailable(
            f"the {self._name} is unavailable; try again shortly",
            code="store_unavailable",
            retry_after=self._retry_after,
        )

    def _outage(self, error: BaseException) -> None:
        if not self._down:
            # The error's class and text, never a traceback per request.
            log.warning("%s unreachable (%s: %s); answering 503 until it answers", self._name,
                        type(error).__name__, error or "timed out")  # fmt: skip
            self._down = True
            self._health_changed.set()

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        if self._down:
            raise self._unavailable()
        try:
            async with asyncio.timeout(self._call_timeout):
                return await call()
        except self._failures as error:
            self._outage(error)
            raise self._unavailable() from None

    async def watch(self, on_health: Callable[[bool], Awaitable[None]]) -> None:
        """Probes the backend forever; tells `on_health` the state first and then every change."""
        reported: bool | None = None
        while True:
            try:
                async with asyncio.timeout(self._call_timeout):
                    await self._inner.ping()
            except self._failures as error:
                self._outage(error)
            else:
                if self._down:
                    log.info("%s reachable again", self._name)
                    self._down = False
            healthy = not self._down
            if healthy != reported:
                reported = healthy
                await on_health(healthy)
            self._health_changed.clear()
            # A failing call wakes the loop at once, so readiness follows the first failed request.
            try:
                async with asyncio.timeout(self._probe_interval):
                    await self._health_changed.wait()
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
    ) -> Assignment | None:
        return await self._call(
            lambda: self._inner.assign(
                room, user_id, candidates, keep_on, soft_capacity, hard_limit, lease_seconds, now
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

    async def joins(self) -> dict[str, int]:
        return await self._call(self._inner.joins)

    async def ping(self) -> None:
        await self._call(self._inner.ping)

    async def close(self) -> None:
        await self._inner.close()
