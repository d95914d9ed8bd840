"""The guarded lease store: outages become fast `Unavailable`s, logged once, and end by themselves."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Sequence

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
    """The memory store behind switches: working, failing, hanging like a frozen server, or slow to
    serve calls while its probe still answers (this process overloaded, not the backend down)."""

    def __init__(self) -> None:
        super().__init__()
        self.failure: BaseException | None = None
        self.hang = False
        self.slow_calls = False
        self.calls = 0
        self.probes = 0

    async def _reach(self) -> None:
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
        region_quota: int = 0,
    ) -> Assignment | None:
        self.calls += 1
        if self.slow_calls:
            await asyncio.Event().wait()
        await self._reach()
        return await super().assign(
            room, user_id, candidates, keep_on, soft_capacity, hard_limit, lease_seconds, now, region_quota
        )

    async def ping(self) -> None:
        self.probes += 1
        await self._reach()


def guarded(inner: FlakyStore) -> GuardedLeaseStore:
    return GuardedLeaseStore(inner, (BackendDown,), call_timeout=0.2, probe_interval=0.05, name="test store")


async def join(store: GuardedLeaseStore, user: str) -> Assignment | None:
    return await store.assign("main", user, [A], {A.stage_arn}, 10, 10, 60, T0)


async def _until(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def watching(store: GuardedLeaseStore) -> AsyncIterator[list[bool]]:
    """Runs the store's probe; yields what it told readiness, in order."""
    seen: list[bool] = []

    async def on_health(healthy: bool) -> None:
        seen.append(healthy)

    watcher = asyncio.create_task(store.watch(on_health))
    try:
        await _until(lambda: seen == [True])
        yield seen
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


async def test_an_outage_answers_unavailable_at_once_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    inner = FlakyStore()
    store = guarded(inner)
    async with watching(store) as seen:
        assert await join(store, "before") is not None
        inner.failure = BackendDown("connection refused")
        errors = []
        with pytest.raises(Unavailable) as raised:
            await join(store, "first")
        errors.append(raised.value)
        # The failed call woke the probe, which confirmed the outage: readiness drops at once.
        await _until(lambda: seen == [True, False])
        calls = inner.calls
        for i in range(20):
            with pytest.raises(Unavailable) as raised:
                await join(store, f"v{i}")
            errors.append(raised.value)
    assert inner.calls == calls, "during an outage the backend is left alone"
    assert {(e.code, e.retry_after) for e in errors} == {("store_unavailable", 1)}
    assert "refused" not in errors[0].message, "the backend's own words stay in the log"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "test store unreachable" in warnings[0].getMessage()


async def test_a_hanging_backend_costs_one_call_timeout() -> None:
    inner = FlakyStore()
    store = guarded(inner)
    inner.hang = True
    started = time.monotonic()
    with pytest.raises(Unavailable):
        await join(store, "v")
    assert time.monotonic() - started < 1.0


async def test_a_late_call_while_the_backend_answers_is_not_an_outage() -> None:
    inner = FlakyStore()
    store = guarded(inner)
    async with watching(store) as seen:
        inner.slow_calls = True
        probes = inner.probes
        with pytest.raises(Unavailable):
            await join(store, "v")
        inner.slow_calls = False
        # The late call woke the probe; the backend answered it, so readiness never dropped.
        await _until(lambda: inner.probes > probes)
        assert await join(store, "w") is not None
    assert seen == [True]


async def test_a_bug_is_not_an_outage() -> None:
    inner = FlakyStore()
    store = guarded(inner)
    async with watching(store) as seen:
        inner.failure = ValueError("a script error")
        with pytest.raises(ValueError, match="script error"):
            await join(store, "v")
        inner.failure = None
        assert await join(store, "w") is not None
    assert seen == [True]


async def test_the_outage_ends_by_itself_when_the_backend_answers() -> None:
    inner = FlakyStore()
    store = guarded(inner)
    async with watching(store) as seen:
        inner.failure = BackendDown("gone")
        with pytest.raises(Unavailable):
            await join(store, "v")
        await _until(lambda: seen == [True, False])
        inner.failure = None
        await _until(lambda: seen == [True, False, True])
        assert await join(store, "v") is not None
