"""Serving the app: one process, or FANOUT_GATEWAY_WORKERS processes sharing one port."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import os
import time
from collections.abc import Sequence
from multiprocessing.process import BaseProcess
from typing import Any

from gateway.app import create_app
from gateway.config import GatewaySettings
from gateway.http_server import start_http_server
from services.common.lifecycle import freeze_startup_heap, run_service, wait_for_stop_signal
from services.common.logs import configure_logging

log = logging.getLogger("gateway")

# Shorter than a pod's default 30 s termination grace, so in-flight requests finish before SIGKILL.
SHUTDOWN_GRACE_SECONDS = 10.0
# A worker gets this long beyond its own grace to exit before it is killed.
_WORKER_EXIT_MARGIN_SECONDS = 2.0


async def serve(settings: GatewaySettings) -> None:
    """One process serving the app until SIGTERM or SIGINT."""
    runner = await start_http_server(create_app(settings), settings, shutdown_timeout=SHUTDOWN_GRACE_SECONDS)
    freeze_startup_heap()
    try:
        for address in runner.addresses:
            log.info(
                "gateway listening on http://%s:%s (%s mode, pid %d)",
                address[0],
                address[1],
                settings.mode,
                os.getpid(),
            )
        await wait_for_stop_signal()
        log.info("stopping")
    finally:
        await runner.cleanup()


def _worker(settings: GatewaySettings) -> None:
    """A worker process's entry point: the same app and settings, serving the shared port.

    Here rather than in __main__, which a spawned process does not import.
    """

    async def main() -> None:
        configure_logging("gateway", json_lines=settings.log_json)
        await serve(settings)

    run_service(main)


async def run_workers(settings: GatewaySettings) -> None:
    """Starts FANOUT_GATEWAY_WORKERS processes on one port (SO_REUSEPORT) and stops them together.

    Workers share nothing but the services behind them. One that exits on its own stops them all and
    this process with code 1, so a supervisor (Kubernetes, `make run`) sees the failure.
    """
    # Spawned, not forked: this process already runs an event loop.
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_worker, args=(settings,), name=f"gateway-worker-{index}")
        for index in range(settings.workers)
    ]
    for worker in workers:
        worker.start()
    log.info("gateway started %d workers on port %d", len(workers), settings.port)
    stop = asyncio.create_task(wait_for_stop_signal())
    exited: asyncio.Task[list[Any]] = asyncio.create_task(
        asyncio.to_thread(multiprocessing.connection.wait, [worker.sentinel for worker in workers])
    )
    await asyncio.wait({stop, exited}, return_when=asyncio.FIRST_COMPLETED)
    # Exit code 0 is a worker stopped by a signal sent to the whole group (Ctrl-C): a stop, not a failure.
    failed = [worker for worker in workers if worker.exitcode not in (None, 0)]
    for worker in failed:
        log.error("gateway worker %s exited with code %s; stopping the others", worker.name, worker.exitcode)
    stop.cancel()
    await _stop_workers(workers)
    await asyncio.gather(stop, exited, return_exceptions=True)
    if failed:
        raise SystemExit(1)


async def _stop_workers(workers: Sequence[BaseProcess]) -> None:
    for worker in workers:
        if worker.exitcode is None:
            worker.terminate()  # SIGTERM: each drains like a single gateway
    deadline = time.monotonic() + SHUTDOWN_GRACE_SECONDS + _WORKER_EXIT_MARGIN_SECONDS
    for worker in workers:
        await asyncio.to_thread(worker.join, max(0.0, deadline - time.monotonic()))
        if worker.exitcode is None:
            log.warning("gateway worker %s did not stop in time; killing it", worker.name)
            worker.kill()
            await asyncio.to_thread(worker.join)
