"""Composition root of the allocator process."""

from __future__ import annotations

import logging

import grpc
from prometheus_client import CollectorRegistry

from services.allocator.config import read_settings
from services.allocator.server import open_store, start_allocator
from services.common.ivs_calls import make_ivs_client
from services.common.lifecycle import (
    freeze_startup_heap,
    run_service,
    settings_or_exit,
    wait_for_stop_signal,
)
from services.common.logs import configure_logging
from services.common.metrics_endpoint import serve_metrics

log = logging.getLogger("services.allocator")


async def main() -> None:
    settings = settings_or_exit("allocator", read_settings)
    configure_logging("allocator", settings.log_json)
    registry = CollectorRegistry()
    ivs_client = make_ivs_client(
        settings.ivs.region, settings.ivs.endpoint_url, settings.ivs.local_credentials
    )
    serve_metrics(settings.metrics_host, settings.metrics_port, registry)
    channel = grpc.aio.insecure_channel(settings.stagemanager_addr)
    service = await start_allocator(settings, ivs_client, channel, registry, open_store(settings))
    freeze_startup_heap()
    log.info(
        "allocator serving on port %d (%s tokens)",
        service.port,
        "self-signed" if settings.self_signed else "CreateParticipantToken",
    )
    await wait_for_stop_signal()
    log.info("stopping")
    await service.stop(settings.shutdown_grace_seconds)
    await channel.close()


if __name__ == "__main__":
    run_service(main)
