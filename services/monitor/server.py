"""Assembles the monitor: IVS caller within the budget, polling loop, reporter, optional SQS consumer."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from services.common.grpc_server import GrpcServer, GrpcServerMetrics, start_grpc_server
from services.common.ivs_calls import CallBudget, IvsCaller, IvsMetrics
from services.common.ivs_quotas import OPERATION_RATES
from services.common.lifecycle import cancel_and_wait
from services.monitor.clients import allocator_sender, stagemanager_sender
from services.monitor.config import MonitorSettings
from services.monitor.consumer import EventConsumer
from services.monitor.ivs import MonitorIvsApi
from services.monitor.metrics import MonitorMetrics
from services.monitor.monitor import StageMonitor
from services.monitor.observations import ALLOCATOR, STAGEMANAGER, ObservationReporter
from services.monitor.sqs import SqsQueue

log = logging.getLogger(__name__)

MONITOR_OPERATIONS = ("ListStages", "GetStage", "ListParticipants")


@dataclass
class MonitorService:
    grpc: GrpcServer
    monitor: StageMonitor
    reporter: ObservationReporter
    caller: IvsCaller
    queue: SqsQueue | None
    tasks: list[asyncio.Task[None]]

    @property
    def port(self) -> int:
        return self.grpc.port

    async def stop(self, grace: float) -> None:
        # gRPC (health only) first, so a probe sees it going while its polling ends; nothing it does is
        # lost when a pass is cut short: the next monitor's first pass sees the same IVS.
        await self.grpc.stop(grace)
        await cancel_and_wait(self.tasks)
        self.caller.close()
        if self.queue is not None:
            self.queue.close()


def monitor_budget(max_calls_per_second: float) -> CallBudget:
    """The monitor's own share of each operation's rate: never above what IVS allows."""
    return CallBudget(
        {op: min(max_calls_per_second, OPERATION_RATES[op]) for op in MONITOR_OPERATIONS},
        default_tps=max_calls_per_second,
    )


async def start_monitor(
    settings: MonitorSettings,
    ivs_client: Any,
    allocator_channel: grpc.aio.Channel,
    stagemanager_channel: grpc.aio.Channel,
    registry: CollectorRegistry,
    sqs_client: Any | None = None,
) -> MonitorService:
    """Serves health at once (NOT_SERVING) and becomes SERVING when the first pass over the Stages is done.

    No API of its own: the monitor pushes what it sees (ReportObservedViewers, ReportObservations) and
    exports metrics; the gRPC server is there for the standard health check and server metrics.
    """
    caller = IvsCaller(ivs_client, monitor_budget(settings.max_calls_per_second), IvsMetrics(registry))
    metrics = MonitorMetrics(registry, settings.stage_quota)
    reporter = ObservationReporter(
        {
            ALLOCATOR: allocator_sender(allocator_channel, settings.report_timeout_seconds),
            STAGEMANAGER: stagemanager_sender(stagemanager_channel, settings.report_timeout_seconds),
        },
        metrics,
        retry_seconds=settings.interval_seconds,
    )
    monitor = StageMonitor(
        MonitorIvsApi(caller),
        reporter,
        metrics,
        settings.cluster_id,
        settings.interval_seconds,
        settings.pages_per_turn,
    )
    server = await start_grpc_server(
        settings.listen, lambda _: None, [], GrpcServerMetrics(registry), serving=False
    )
    tasks = [
        asyncio.create_task(monitor.run()),
        asyncio.create_task(reporter.run()),
        asyncio.create_task(_serve_after_first_pass(monitor, server)),
    ]
    queue: SqsQueue | None = None
    if settings.sqs is not None and sqs_client is not None:
        queue = SqsQueue(sqs_client, settings.sqs.queue_url, settings.sqs.wait_seconds)
        tasks.append(asyncio.create_task(EventConsumer(queue, monitor, metrics).run()))
        log.info("consuming IVS Stage Update events from SQS")
    return MonitorService(server, monitor, reporter, caller, queue, tasks)


async def _serve_after_first_pass(monitor: StageMonitor, server: GrpcServer) -> None:
    await monitor.first_pass.wait()
    await server.set_serving(True)
