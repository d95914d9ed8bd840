"""Runs a service's main coroutine until SIGTERM or SIGINT asks it to stop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any, TypeVar

import uvloop

from services.common.env import ConfigError

T = TypeVar("T")
log = logging.getLogger(__name__)


def settings_or_exit(service: str, read: Callable[[Mapping[str, str]], T]) -> T:
    """The process's settings from its environment; a bad value ends it with one clear line."""
    try:
        return read(os.environ)
    except ConfigError as error:
        # Logging is not configured yet, and this one line is all an operator needs.
        sys.stderr.write(f"{service}: configuration error: {error}\n")
        raise SystemExit(2) from None


async def wait_for_stop_signal() -> None:
    """Returns when the process receives SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], again_after: float = 2.0) -> None:
    """Cancels background tasks and waits until each has finished unwinding.

    A task still running `again_after` seconds after its cancellation is cancelled again (and again):
    redis-py's asyncio client can swallow a cancellation (see raise_if_cancelled), and a loop around it
    would otherwise keep a stopping process alive until something kills it.
    """
    pending = {task for task in tasks if not task.done()}
    for task in pending:
        task.cancel()
    while pending:
        done, pending = await asyncio.wait(pending, timeout=again_after)
        for task in done:
            # Retrieved, so that an error raised while unwinding is not reported as never retrieved.
            if not task.cancelled():
                task.exception()
        for task in pending:
            log.warning("task %s still running %.0f s after it was cancelled; cancelling it again",
                        task.get_name(), again_after)  # fmt: skip
            task.cancel()


def raise_if_cancelled() -> None:
    """Raises the cancellation of the current task, if one is pending.

    For a loop around redis-py's asyncio client: a call can answer (or fail) as if nothing happened
    although the task was cancelled meanwhile (seen with 8.1.0, redis-py issue #2028), and the loop
    would go on forever under a `cancel_and_wait`.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def freeze_startup_heap() -> None:
    """Moves everything alive after start-up out of the garbage collector's view.

    Modules, clients and servers live as long as the process; scanning them in every full collection
    cost 15-180 ms pauses under load, enough to break a p99 latency target on its own.
    """
    gc.collect()
    gc.freeze()


def run_service(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Runs `main` on uvloop (libuv: less CPU per request for aiohttp and grpc.aio than the default
    loop), with a Ctrl-C before the handlers are installed treated as a normal stop."""
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(main())
