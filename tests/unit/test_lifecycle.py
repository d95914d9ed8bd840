"""Stopping background tasks: cancel_and_wait ends even a task that swallowed its cancellation."""

from __future__ import annotations

import asyncio
import logging

import pytest

from services.common.lifecycle import cancel_and_wait


async def test_a_task_that_swallows_its_cancellation_is_cancelled_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    swallowed = 0

    async def loop_like_a_swallowing_client() -> None:
        # What a loop around redis-py 8.1's asyncio client can do: a call answers as if nothing
        # happened although the task was cancelled, and the loop goes on.
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1

    task = asyncio.create_task(loop_like_a_swallowing_client(), name="swallower")
    await asyncio.sleep(0.05)
    await asyncio.wait_for(cancel_and_wait([task], again_after=0.1), timeout=5)
    assert task.cancelled() and swallowed == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("swallower" in message and "cancelling it again" in message for message in warnings)


async def test_tasks_that_end_on_cancellation_end_at_once_and_their_errors_are_retrieved() -> None:
    async def ends_with_an_error() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            raise RuntimeError("while unwinding")

    tasks = [asyncio.create_task(asyncio.sleep(10)), asyncio.create_task(ends_with_an_error())]
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await cancel_and_wait(tasks, again_after=5)
    assert loop.time() - started < 1
    assert tasks[0].cancelled()
    assert isinstance(tasks[1].exception(), RuntimeError)
