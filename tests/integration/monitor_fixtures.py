"""The monitor started in-process next to a running system, as its __main__ builds it."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from moto.server import ThreadedMotoServer
from prometheus_client import CollectorRegistry

from services.common.ivs_calls import make_ivs_client
from services.monitor.config import read_settings
from services.monitor.server import MonitorService, start_monitor
from services.monitor.sqs import make_sqs_client
from tests.integration.system import System
from tests.integration.waiting import eventually
from tests.ports import free_port


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


@dataclass
class LocalSqsQueue:
    endpoint: str
    url: str
    client: Any

    async def send(self, body: str) -> None:
        await asyncio.to_thread(self.client.send_message, QueueUrl=self.url, MessageBody=body)


def reading_events_from(queue: LocalSqsQueue) -> dict[str, str]:
    """Monitor settings: events from `queue`, and a polling pass only once a minute, so whatever happens
    within a test reaches the Stages through the events."""
    return {
        "FANOUT_MONITOR_INTERVAL_SECONDS": "60",
        "FANOUT_MONITOR_SQS_QUEUE_URL": queue.url,
        "FANOUT_MONITOR_SQS_ENDPOINT": queue.endpoint,
        "FANOUT_MONITOR_SQS_WAIT_SECONDS": "1",
    }


def new_queue_name() -> str:
    return f"ivs-stage-events-{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def running_sqs_queue(
    port: int | None = None, name: str | None = None, visibility_timeout: int = 30
) -> Iterator[LocalSqsQueue]:
    """A real SQS API over HTTP on loopback (moto's server, on `port` if given), with one new empty queue.

    moto keeps its queues in one store per process, whichever server serves them: each queue has a name
    of its own (unless given), so no test reads what an earlier one left behind. `visibility_timeout` is
    how long a message read and not deleted stays hidden before it comes back.
    """
    name = name or new_queue_name()
    port = port or free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.session.Session().client(
        "sqs",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="local",
        aws_secret_access_key="local",
    )
    try:
        url = client.create_queue(QueueName=name, Attributes={"VisibilityTimeout": str(visibility_timeout)})[
            "QueueUrl"
        ]
        yield LocalSqsQueue(endpoint, url, client)
    finally:
        server.stop()
