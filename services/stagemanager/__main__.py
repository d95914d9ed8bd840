"""Composition root of the stage manager process."""

from __future__ import annotations

import asyncio
import logging
import os

import grpc
from prometheus_client import CollectorRegistry

from services.common.ivs_calls import make_ivs_client
from services.common.lifecycle import (
    freeze_startup_heap,
    run_service,
    settings_or_exit,
    wait_for_stop_signal,
)
from services.common.logs import configure_logging
from services.common.metrics_endpoint import serve_metrics
from services.stagemanager.config import read_settings
from services.stagemanager.server import start_stage_manager

log = logging.getLogger("services.stagemanager")


async def main() -> None:
    settings = settings_or_exit("stagemanager", read_settings)
    configure_logging("stagemanager", settings.log_json)
    registry = CollectorRegistry()
    ivs_client = make_ivs_client(
        settings.ivs.region, settings.ivs.endpoint_url, settings.ivs.local_credentials
    )
    channel_client = make_ivs_client(
        settings.ivs.region, settings.channel_endpoint_url, settings.ivs.local_credentials, service="ivs"
    )
    serve_metrics(settings.metrics_host, settings.metrics_port, registry)
    allocator_channel = grpc.aio.insecure_channel(settings.allocator_addr)
    service = await start_stage_manager(settings, ivs_client, channel_client, allocator_channel, registry)
    freeze_startup_heap()
    log.info(
        "stage manager serving on port %d (cluster %s, %s mode)",
        service.port,
        settings.rooms.cluster_id,
        settings.ivs.mode,
    )
    stop_signal = asyncio.create_task(wait_for_stop_signal())
    lost_lead = asyncio.create_task(service.must_exit.wait())
    await asyncio.wait([stop_signal, lost_lead], return_when=asyncio.FIRST_COMPLETED)
    stop_signal.cancel()
    lost_lead.cancel()
    if service.must_exit.is_set():
        # Lost the leader lease: end at once, with nothing to tidy (every IVS and Redis write is
        # fenced) and no wait on a task that might not stop (redis-py can swallow a cancellation).
        # The orchestrator starts a fresh follower.
        logging.shutdown()
        os._exit(3)
    log.info("stopping")
    await service.stop(settings.shutdown_grace_seconds)
    await allocator_channel.close()


if __name__ == "__main__":
    run_service(main)
