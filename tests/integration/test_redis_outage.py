"""Redis stopped or frozen under the allocator: viewers get fast 503s with the error shape, readiness
follows within about a second, one log line per outage, and the system recovers by itself."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import aiohttp
import pytest

from services.common.timeouts import GATEWAY_RPC_SECONDS, STORE_CALL_SECONDS, STORE_CALLS_PER_REQUEST
from tests.integration.system import System, running_system
from tests.integration.test_viewers import start_show
from tests.integration.waiting import eventually
from tests.redis_server import RedisServer

# A viewer's request makes at most this many store calls, each bounded; the rest is slack for a busy
# machine. Still well under the gateway's own deadline, which would answer 504 instead.
ANSWER_WITHIN = STORE_CALLS_PER_REQUEST * STORE_CALL_SECONDS + 1.0
assert ANSWER_WITHIN < GATEWAY_RPC_SECONDS


async def post(
    http: aiohttp.ClientSession, system: System, path: str, body: dict
) -> tuple[int, dict, dict, float]:
    started = time.monotonic()
    async with http.post(f"{system.gateway_url}{path}", json=body) as response:
        payload = await response.json() if response.content_type == "application/json" else {}
        return response.status, payload, dict(response.headers), time.monotonic() - started


async def ready(http: aiohttp.ClientSession, system: System) -> int:
    async with http.get(f"{system.gateway_url}/readyz") as response:
        return response.status


def assert_fast_503s(answers: list[tuple[int, dict, dict, float]]) -> None:
    statuses = [status for status, *_ in answers]
    assert statuses == [503] * len(answers), statuses
    for _, body, headers, elapsed in answers:
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
        assert body["error"]["code"] == "store_unavailable"
        assert int(headers["Retry-After"]) >= 1
        assert elapsed < ANSWER_WITHIN, f"a 503 took {elapsed:.2f} s"


@contextlib.asynccontextmanager
async def show_on_redis(
    tmp_path: Path, redis: RedisServer
) -> AsyncIterator[tuple[System, aiohttp.ClientSession]]:
    """The system with its leases on `redis`, and a show on: viewers can be placed."""
    async with (
        running_system(
            tmp_path, FANOUT_MIN_STAGES="2", FANOUT_STORE="redis", FANOUT_REDIS_URL=redis.url
        ) as system,
        aiohttp.ClientSession() as http,
    ):
        await start_show(http, system)
        yield system, http


def store_up(system: System) -> float | None:
    return system.registries["allocator"].get_sample_value("fanout_lease_store_up")


def outage_records(
    caplog: pytest.LogCaptureFixture,
) -> tuple[list[logging.LogRecord], list[logging.LogRecord]]:
    """(lines announcing an outage, records that carry a traceback)."""
    announced = [r for r in caplog.records if "Redis lease store unreachable" in r.getMessage()]
    tracebacks = [r for r in caplog.records if r.exc_info]
    return announced, tracebacks


async def test_redis_down_answers_503_with_the_error_shape_and_recovers(
    tmp_path: Path, private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with show_on_redis(tmp_path, private_redis) as (system, http):
        assert (await post(http, system, "/api/token/viewer", {"userId": "early"}))[0] == 200
        caplog.clear()

        private_redis.stop()
        joins = await asyncio.gather(
            *(post(http, system, "/api/token/viewer", {"userId": f"v{i}"}) for i in range(50))
        )
        heartbeat = await post(http, system, "/api/viewer/heartbeat", {"room": "main", "userId": "early"})
        await eventually(lambda: _is(ready(http, system), 503), what="readiness to drop", within=3)
        store_up_during = store_up(system)

        private_redis.start()
        await eventually(lambda: _is(ready(http, system), 200), what="readiness to come back", within=10)
        after = await post(http, system, "/api/token/viewer", {"userId": "after"})
        store_up_after = store_up(system)

    assert_fast_503s([*joins, heartbeat])
    assert after[0] == 200, after
    assert (store_up_during, store_up_after) == (0, 1), "the outage shows on the allocator's metrics"
    announced, tracebacks = outage_records(caplog)
    assert len(announced) == 1, "one log line for the outage, not one per request"
    assert tracebacks == []


async def test_a_frozen_redis_costs_a_viewer_a_fast_503_not_the_gateways_deadline(
    tmp_path: Path, private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with show_on_redis(tmp_path, private_redis) as (system, http):
        placed = {}
        for i in range(10):
            _, body, _, _ = await post(http, system, "/api/token/viewer", {"userId": f"seat{i}"})
            placed[body["userId"]] = body["stageArn"]
        caplog.clear()

        private_redis.freeze()  # SIGSTOP: connections stay open, nothing answers
        try:
            frozen_at = time.monotonic()
            joins = await asyncio.gather(
                *(post(http, system, "/api/token/viewer", {"userId": f"v{i}"}) for i in range(20))
            )
            await eventually(lambda: _is(ready(http, system), 503), what="readiness to drop", within=3)
            not_ready_after = time.monotonic() - frozen_at
            later = await post(http, system, "/api/token/viewer", {"userId": "later"})
        finally:
            private_redis.thaw()
        await eventually(lambda: _is(ready(http, system), 200), what="readiness to come back", within=10)
        renewed = {
            user: (await post(http, system, "/api/viewer/heartbeat", {"room": "main", "userId": user}))[1]
            for user in placed
        }

    assert_fast_503s([*joins, later])
    assert later[3] < 0.5, "during a known outage the answer comes at once, without waiting on Redis"
    assert not_ready_after < ANSWER_WITHIN + 1.0
    assert {user: body.get("stageArn") for user, body in renewed.items()} == placed, "leases outlive a freeze"
    announced, tracebacks = outage_records(caplog)
    assert len(announced) == 1
    assert tracebacks == []


async def _is(status: Awaitable[int], expected: int) -> bool:
    return await status == expected
