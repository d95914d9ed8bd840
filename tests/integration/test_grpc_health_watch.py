"""Every service's gRPC server answers the standard health service's Watch as well as Check: a client
(a mesh, a load balancer, grpc-health-probe --watch) follows SERVING / NOT_SERVING as it changes.

Watch is a handler that answers with context.write() (a coroutine, not an async generator); the error
mapping interceptor once broke it with an internal error."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.grpc_server import start_grpc_server

SERVICE = "fanout.v1.Example"


async def test_health_watch_follows_serving_changes() -> None:
    server = await start_grpc_server("127.0.0.1:0", lambda _: None, [SERVICE], None, serving=False)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            first = await asyncio.wait_for(watch.read(), 5)
            await server.set_serving(True)
            second = await asyncio.wait_for(watch.read(), 5)
            watch.cancel()
    finally:
        await server.stop(0)

    assert first.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert second.status == health_pb2.HealthCheckResponse.SERVING
