"""Composition root: `python -m gateway` reads config, sets up logging and keys, serves until signalled."""

from __future__ import annotations

import logging
from dataclasses import replace

from gateway.auth import LOCAL_KEY_FILE, load_or_create_local_publisher_key
from gateway.config import GatewaySettings
from gateway.serving import run_workers, serve
from services.common.lifecycle import run_service, settings_or_exit
from services.common.logs import configure_logging

log = logging.getLogger("gateway")


async def main() -> None:
    settings = settings_or_exit("gateway", GatewaySettings.from_env)
    configure_logging("gateway", json_lines=settings.log_json)
    settings = _with_publisher_keys(settings)
    if settings.workers == 1:
        await serve(settings)
    else:
        await run_workers(settings)


def _with_publisher_keys(settings: GatewaySettings) -> GatewaySettings:
    if settings.publisher_keys:
        return settings
    # Only local mode gets here: config refuses aws mode without FANOUT_PUBLISHER_KEYS.
    try:
        key, created = load_or_create_local_publisher_key(settings.state_dir)
    except (OSError, ValueError) as error:
        log.error("cannot read or create the local publisher key in %s: %s", settings.state_dir, error)
        raise SystemExit(2) from None
    # The key itself never goes to the log; the broadcaster copies it from the file.
    log.info(
        "publisher key %s %s",
        "created in" if created else "read from",
        settings.state_dir / LOCAL_KEY_FILE,
    )
    return replace(settings, publisher_keys=(key,))


if __name__ == "__main__":
    run_service(main)
