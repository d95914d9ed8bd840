"""The guarded lease store: outages become fast `Unavailable`s, logged once, and end by themselves."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Sequence

import pytest

from services.allocator.placement import Candidate
from services.allocator.store import Assignment, MemoryLeaseStore
from services.allocator.store_guard import GuardedLeaseStore
from services.common.errors import Unavailable

A = Candidate("arn:aws:ivs:us-east-1:123456789012:stage/s0", 0, 0)
T0 = 1_700_000_000.0


class BackendDown(Exception):
    """Stands for the backend's connection error (redis.ConnectionError)."""


class FlakyStore(MemoryLeaseStore):
    """The memory store behind a switch: working, failing, or hanging like a frozen server."""

    def __init__(self) -> None:
        super().__init__()
        self.failure: BaseException | None = None
        self.hang = False
        self.calls = 0

    async def _reach(self) -> None:
        self.calls += 1
        if self.hang:
            await asyncio.Event().wait()
        if self.failure is not None:
            raise self.failure

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
        await self._reach()
        return await super().assign(
            room, user_id, candidates, keep_on, soft_capacity, hard_limit, lease_seconds, now
        )

    async def ping(self) -> None:
        await self._reach()


def guarded(inner: FlakyStore) -> GuardedLeaseStore:
    return GuardedLeaseStore(inner, (BackendDown,), call_timeout=0.2, probe_interval=0.05, name="test store")


async def join(store: GuardedLeaseStore, user: str) -> Assignment | None:
    return await store.assign("main", user, [A], {A.stage_arn}, 10, 10, 60, T0)


async def test_an_outage_answers_unavailable_at_once_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    inner = FlakyStore()
    store = guarded(inner)
    assert await join(store, "before") is not None
    inner.failure = BackendDown("connection refused")
    errors = []
    for i in range(20):
        with pytest.raises(Unavailable) as raised:
            await join(store, f"v{i}")
        errors.append(raised.value)
    assert inner.calls == 2, "after the first failure the backend is left alone"
    assert {(e.code, e.retry_after) for e in errors} == {("store_unavailable", 1)}
    assert "refused" not in errors[0].message, "the backend's own words stay in the log"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "test store unreachable" in warnings[0].getMessage()
    assert not store.available


async def test_a_hanging_backend_costs_one_call_timeout() -> None:
    inner = FlakyStore()
    store = guarded(inner)
    inner.hang = True
    started = time.monotonic()
    with pytest.raises(Unavailable):
        await join(store, "v")
    assert time.monotonic() - started < 1.0
    with pytest.raises(Unavailable):
        await join(store, "w")
    assert time.monotonic() - started < 1.0


async def test_a_bug_is_not_an_outage() -> None:
    inner = FlakyStore()
    store = guarded(inner)
    inner.failure = ValueError("a script error")
    with pytest.raises(ValueError, match="script error"):
        await join(store, "v")
    assert store.available


async def test_watch_reports_health_and_ends_the_outage_by_itself() -> None:
    inner = FlakyStore()
    store = guarded(inner)
    seen: list[bool] = []

    async def on_health(healthy: bool) -> None:
        seen.append(healthy)

    watcher = asyncio.create_task(store.watch(on_health))
    try:
        await _until(lambda: seen == [True])
        inner.failure = BackendDown("gone")
        with pytest.raises(Unavailable):
            await join(store, "v")
        # The failed call wakes the watcher: readiness does not wait for the next probe.
        await _until(lambda: seen == [True, False])
        inner.failure = None
        await _until(lambda: seen == [True, False, True])
        assert await join(store, "v") is not None
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


async def _until(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)
