"""Composition root of the monitor process."""

from __future__ import annotations

import logging

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
from services.monitor.config import read_settings
from services.monitor.server import start_monitor
from services.monitor.sqs import make_sqs_client

log = logging.getLogger("services.monitor")


async def main() -> None:
    settings = settings_or_exit("monitor", read_settings)
    configure_logging("monitor", settings.log_json)
    registry = CollectorRegistry()
    ivs_client = make_ivs_client(
        settings.ivs.region, settings.ivs.endpoint_url, settings.ivs.local_credentials
    )
    sqs_client = None
    if settings.sqs is not None:
        sqs_client = make_sqs_client(
            settings.sqs.region,
            settings.sqs.endpoint_url,
            local_credentials=settings.ivs.local_credentials and settings.sqs.endpoint_url is not None,
        )
    serve_metrics(settings.metrics_host, settings.metrics_port, registry)
    allocator_channel = grpc.aio.insecure_channel(settings.allocator_addr)
    stagemanager_channel = grpc.aio.insecure_channel(settings.stagemanager_addr)
    service = await start_monitor(
        settings, ivs_client, allocator_channel, stagemanager_channel, registry, sqs_client
    )
    freeze_startup_heap()
    log.info(
        "monitor serving on port %d (cluster %s, a pass every %.1fs at most, %.1f IVS calls/s per operation)",
        service.port,
        settings.cluster_id,
        settings.interval_seconds,
        settings.max_calls_per_second,
    )
    await wait_for_stop_signal()
    log.info("stopping")
    await service.stop(settings.shutdown_grace_seconds)
    await allocator_channel.close()
    await stagemanager_channel.close()


if __name__ == "__main__":
    run_service(main)
