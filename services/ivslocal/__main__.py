"""Runs the IVS emulator: python -m services.ivslocal."""

from __future__ import annotations

import logging

from aiohttp import web

from services.common.lifecycle import run_service, settings_or_exit, wait_for_stop_signal
from services.common.logs import configure_logging
from services.ivslocal.app import create_app
from services.ivslocal.config import load_settings
from services.ivslocal.model import IvsState

log = logging.getLogger("services.ivslocal")


async def main() -> None:
    """Serves until SIGTERM or SIGINT, then closes the listener and open sockets cleanly."""
    settings = settings_or_exit("ivslocal", load_settings)
    configure_logging("ivslocal", json_lines=False)
    runner = web.AppRunner(create_app(settings, IvsState(settings)), handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.host, settings.port).start()
        log.info(
            "ivs-realtime emulator listening on http://%s:%d (stage quota %d, rate limits %s)",
            settings.host,
            settings.port,
            settings.stage_quota,
            f"on x{settings.rate_scale:g}" if settings.rate_limits else "off",
        )
        await wait_for_stop_signal()
        log.info("stopping")
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    run_service(main)
