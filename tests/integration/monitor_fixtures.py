"""The monitor started in-process next to a running system, as its __main__ builds it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from services.common.ivs_calls import make_ivs_client
from services.monitor.config import read_settings
from services.monitor.server import MonitorService, start_monitor
from services.monitor.sqs import make_sqs_client
from tests.integration.system import System
from tests.integration.waiting import eventually


@dataclass
class RunningMonitor:
    service: MonitorService
    registry: CollectorRegistry

    def metric(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)

    async def serving(self) -> bool:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.service.port}") as channel:
            response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


@contextlib.asynccontextmanager
async def running_monitor(system: System, **overrides: str) -> AsyncIterator[RunningMonitor]:
    """The monitor built as its __main__ builds it, on port 0, next to the running system."""
    env = {
        **system.env,
        "FANOUT_MONITOR_LISTEN": "127.0.0.1:0",
        "FANOUT_MONITOR_METRICS_PORT": "0",
        "FANOUT_ALLOCATOR_ADDR": system.allocator_addr,
        "FANOUT_STAGEMANAGER_ADDR": system.stagemanager_addr,
        "FANOUT_MONITOR_INTERVAL_SECONDS": "0.2",
        "FANOUT_MONITOR_REPORT_TIMEOUT_SECONDS": "1",
        **overrides,
    }
    settings = read_settings(env)
    registry = CollectorRegistry()
    allocator_channel = grpc.aio.insecure_channel(settings.allocator_addr)
    stagemanager_channel = grpc.aio.insecure_channel(settings.stagemanager_addr)
    sqs_client = (
        make_sqs_client(settings.sqs.region, settings.sqs.endpoint_url, local_credentials=True)
        if settings.sqs
        else None
    )
    service = await start_monitor(
        settings,
        make_ivs_client("us-east-1", system.ivs.url, local_credentials=True),
        allocator_channel,
        stagemanager_channel,
        registry,
        sqs_client,
    )
    monitor = RunningMonitor(service, registry)
    try:
        await eventually(monitor.serving, what="the monitor's first pass (health SERVING)")
        yield monitor
    finally:
        await service.stop(0.1)
        await allocator_channel.close()
        await stagemanager_channel.close()
