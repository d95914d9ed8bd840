"""Composition root: `python -m gateway` reads config, sets up logging and keys, serves until signalled."""

from __future__ import annotations

import logging
from dataclasses import replace

from gateway.app import create_app
from gateway.auth import LOCAL_KEY_FILE, load_or_create_local_publisher_key
from gateway.config import GatewaySettings
from gateway.http_server import start_http_server
from services.common.lifecycle import (
    freeze_startup_heap,
    run_service,
    settings_or_exit,
    wait_for_stop_signal,
)
from services.common.logs import configure_logging

log = logging.getLogger("gateway")

# Shorter than a pod's default 30 s termination grace, so in-flight requests finish before SIGKILL.
_SHUTDOWN_GRACE_SECONDS = 10.0


async def main() -> None:
    settings = settings_or_exit("gateway", GatewaySettings.from_env)
    configure_logging("gateway", json_lines=settings.log_json)
    if not settings.publisher_keys:
        # Only local mode gets here: config refuses aws mode without FANOUT_PUBLISHER_KEYS.
        try:
            key, created = load_or_create_local_publisher_key(settings.state_dir)
        except (OSError, ValueError) as error:
            log.error("cannot read or create the local publisher key in %s: %s", settings.state_dir, error)
            raise SystemExit(2) from None
        settings = replace(settings, publisher_keys=(key,))
        # The key itself never goes to the log; the broadcaster copies it from the file.
        log.info(
            "publisher key %s %s",
            "created in" if created else "read from",
            settings.state_dir / LOCAL_KEY_FILE,
        )
    runner = await start_http_server(create_app(settings), settings, shutdown_timeout=_SHUTDOWN_GRACE_SECONDS)
    freeze_startup_heap()
    try:
        for address in runner.addresses:
            log.info("gateway listening on http://%s:%s (%s mode)", address[0], address[1], settings.mode)
        await wait_for_stop_signal()
        log.info("stopping")
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    run_service(main)
