"""Runs a service's main coroutine until SIGTERM or SIGINT asks it to stop."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Coroutine
from typing import Any


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


def run_service(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """asyncio.run, with a Ctrl-C before the handlers are installed treated as a normal stop."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
