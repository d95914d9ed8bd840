"""The allocator as a real process behind the gateway's AssignViewers stream: killed (-9) or frozen
(SIGSTOP) while viewers wait on the stream, they get the unary path's answers (503 / 504 with the error
shape), and the gateway recovers by itself once the allocator is back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from services.common.timeouts import GATEWAY_RPC_SECONDS
from tests.integration.ivslocal_fixtures import running_ivslocal
from tests.integration.service_process import ServiceProcess
from tests.integration.system import (
    PUBLISHER_KEY,
    service_env,
    stagemanager_allocator_channel,
    start_gateway,
    start_stagemanager,
    wait_until_serving,
)
from tests.integration.waiting import eventually

UNAVAILABLE = {
    "error": {
        "code": "dependency_unavailable",
        "message": "A backend service is unavailable; try again shortly.",
    }
}
TIMEOUT = {"error": {"code": "dependency_timeout", "message": "A backend service did not answer in time."}}


class AllocatorProcess(ServiceProcess):
    """`python -m services.allocator` on a fixed port, so it can be killed and started again there."""

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        super().__init__("services.allocator", env, log_path)
        self.port = int(env["FANOUT_ALLOCATOR_LISTEN"].rsplit(":", 1)[1])


@dataclass
class Setup:
    allocator: AllocatorProcess
    gateway_url: str
    http: aiohttp.ClientSession

    async def viewer(self, user_id: str) -> tuple[int, Any, Mapping[str, str], float]:
        """(status, JSON body, headers, seconds) of one viewer token request."""
        started = time.monotonic()
        async with self.http.post(f"{self.gateway_url}/api/token/viewer", json={"userId": user_id}) as answer:
            body = await answer.json()
            return answer.status, body, answer.headers, time.monotonic() - started

    async def start_allocator_again(self) -> None:
        """Starts the allocator process again and waits until the gateway places a viewer through it."""
        self.allocator.start()

        async def placed() -> bool:
            return (await self.viewer("after"))[0] == 200

        await eventually(placed, what="a viewer placed by the new allocator", within=30, every=0.2)


@contextlib.asynccontextmanager
async def allocator_as_a_process(
    tmp_path: Path, settings: Mapping[str, str] | None = None
) -> AsyncIterator[Setup]:
    """The emulator, stage manager and gateway in-process; the allocator a child process; a show on."""
    async with running_ivslocal() as ivs:
        env = service_env(ivs.url, tmp_path, {"FANOUT_LOG_JSON": "false", **(settings or {})})
        to_allocator = stagemanager_allocator_channel(env["FANOUT_ALLOCATOR_ADDR"])
        stagemanager = await start_stagemanager(env, CollectorRegistry(), to_allocator)
        allocator = AllocatorProcess(
            {**env, "FANOUT_STAGEMANAGER_ADDR": f"127.0.0.1:{stagemanager.port}"},
            tmp_path / "allocator.log",
        )
        allocator.start()
        runner = None
        try:
            await wait_until_serving(allocator.port)
            runner, gateway_url = await start_gateway(
                env, env["FANOUT_ALLOCATOR_ADDR"], stagemanager.port, CollectorRegistry()
            )
            async with aiohttp.ClientSession() as http:
                async with http.post(
                    f"{gateway_url}/api/token/publisher-all",
                    json={},
                    headers={"Authorization": f"Bearer {PUBLISHER_KEY}"},
                ) as response:
                    assert response.status == 200, await response.text()
                yield Setup(allocator, gateway_url, http)
        finally:
            if runner is not None:
                await runner.cleanup()
            allocator.stop()
            await stagemanager.stop(0.2)


async def test_a_killed_allocator_fails_waiting_viewers_with_503_and_the_gateway_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.assign_stream")
    async with allocator_as_a_process(tmp_path) as setup:
        assert (await setup.viewer("before"))[0] == 200
        # Frozen first, so that the viewers' requests are on the stream, unanswered, when it dies.
        setup.allocator.signal(signal.SIGSTOP)
        waiting = [asyncio.create_task(setup.viewer(f"waiting-{i}")) for i in range(5)]
        await asyncio.sleep(1.0)
        setup.allocator.kill9()
        answers = await asyncio.gather(*waiting)
        while_down = await setup.viewer("while-down")
        await setup.start_allocator_again()

    for status, body, headers, seconds in [*answers, while_down]:
        assert (status, body, headers.get("Retry-After")) == (503, UNAVAILABLE, "2")
        assert seconds < GATEWAY_RPC_SECONDS, "failed when the stream broke, not at the deadline"
    failed = [r.getMessage() for r in caplog.records if "failing 5 waiting requests" in r.getMessage()]
    assert len(failed) == 1, [r.getMessage() for r in caplog.records]


async def test_a_frozen_allocator_costs_a_viewer_the_deadline_answer_and_the_stream_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.assign_stream")
    async with allocator_as_a_process(tmp_path) as setup:
        assert (await setup.viewer("before"))[0] == 200
        setup.allocator.signal(signal.SIGSTOP)
        frozen = await asyncio.gather(*(setup.viewer(f"frozen-{i}") for i in range(3)))
        setup.allocator.signal(signal.SIGCONT)
        thawed = await setup.viewer("thawed")

    for status, body, headers, seconds in frozen:
        assert (status, body, headers.get("Retry-After")) == (504, TIMEOUT, None)
        assert GATEWAY_RPC_SECONDS - 0.5 <= seconds < GATEWAY_RPC_SECONDS + 2
    assert thawed[0] == 200, thawed
    # The late answers to the requests that timed out were dropped; the stream itself never broke.
    assert not [r for r in caplog.records if "AssignViewers stream" in r.getMessage()]


async def test_a_stopping_allocator_ends_the_gateway_stream_itself_and_exits_long_before_its_grace(
    tmp_path: Path,
) -> None:
    # A long grace, so that waiting it out (an open stream holding the server) would show.
    grace = 30.0
    async with allocator_as_a_process(tmp_path, {"FANOUT_SHUTDOWN_GRACE_SECONDS": str(grace)}) as setup:
        assert (await setup.viewer("before"))[0] == 200  # the gateway's stream is open
        started = time.monotonic()
        setup.allocator.signal(signal.SIGTERM)
        await eventually(
            lambda: setup.allocator.exit_code() is not None, "the allocator exiting", within=grace + 5
        )
        took = time.monotonic() - started
        exit_code = setup.allocator.exit_code()
        while_down = await setup.viewer("while-down")
        await setup.start_allocator_again()

    assert exit_code == 0, setup.allocator.log()
    assert took < 10, f"the allocator took {took:.1f} s to stop with a gateway stream open"
    status, body, headers, _ = while_down
    assert (status, body, headers.get("Retry-After")) == (503, UNAVAILABLE, "2")
