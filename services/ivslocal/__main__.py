"""Runs the IVS emulator: python -m services.ivslocal."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from aiohttp import web

from services.common.env import ConfigError
from services.common.logs import configure_logging
from services.ivslocal.app import create_app
from services.ivslocal.config import Settings, load_settings
from services.ivslocal.model import IvsState

log = logging.getLogger(__name__)


async def serve(settings: Settings) -> None:
    """Serves until SIGTERM or SIGINT, then closes the listener and open requests cleanly."""
    state = IvsState(settings)
    runner = web.AppRunner(create_app(settings, state), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    log.info(
        "ivs-realtime emulator listening on http://%s:%d (stage quota %d, rate limits %s)",
        settings.host,
        settings.port,
        settings.stage_quota,
        "on" if settings.rate_limits else "off",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
        log.info("stopping")
    finally:
        await runner.cleanup()


def main() -> int:
    configure_logging("ivslocal", json_lines=False)
    try:
        settings = load_settings(os.environ)
    except ConfigError as error:
        log.error("bad configuration: %s", error)
        return 2
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
