"""The whole control plane in-process on loopback ports, built the way each __main__ builds it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.clients import GatewayClients
from gateway.config import GatewaySettings
from gateway.http_server import start_http_server
from protos.fanout.v1 import allocator_pb2_grpc, stagemanager_pb2_grpc
from services.allocator.config import read_settings as read_allocator_settings
from services.allocator.server import AllocatorService, open_store, start_allocator
from services.common.ivs_calls import make_ivs_client
from services.ivslocal.config import Settings as IvsSettings
from services.stagemanager.config import read_settings as read_stagemanager_settings
from services.stagemanager.server import StageManagerService, start_stage_manager
from tests.integration.fault_proxy import FaultProxy
from tests.integration.ivslocal_fixtures import IvsLocalServer, running_ivslocal
from tests.integration.waiting import eventually
from tests.ports import free_port

PUBLISHER_KEY = "test-publisher-key-0123456789"


@dataclass
class System:
    ivs: IvsLocalServer
    env: dict[str, str]
    stagemanager_service: StageManagerService
    allocator_service: AllocatorService
    gateway_url: str
    publisher_key: str
    registries: dict[str, CollectorRegistry] = field(default_factory=dict)
    _channels: list[grpc.aio.Channel] = field(default_factory=list)

    @property
    def stagemanager_addr(self) -> str:
        return f"127.0.0.1:{self.stagemanager_service.port}"

    @property
    def allocator_addr(self) -> str:
        return f"127.0.0.1:{self.allocator_service.port}"

    def channel(self, address: str) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(address)
        self._channels.append(channel)
        return channel

    @property
    def stagemanager(self) -> stagemanager_pb2_grpc.StageManagerStub:
        return stagemanager_pb2_grpc.StageManagerStub(self.channel(self.stagemanager_addr))

    @property
    def allocator(self) -> allocator_pb2_grpc.AllocatorStub:
        return allocator_pb2_grpc.AllocatorStub(self.channel(self.allocator_addr))

    def publisher_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.publisher_key}"}


def service_env(ivs_url: str, state_dir: Path, overrides: Mapping[str, str]) -> dict[str, str]:
    # The stage manager and allocator call each other, so one address is fixed before either starts.
    allocator_addr = f"127.0.0.1:{free_port()}"
    env = {
        "FANOUT_MODE": "local",
        "FANOUT_IVS_ENDPOINT": ivs_url,
        "FANOUT_STATE_DIR": str(state_dir),
        "FANOUT_STAGEMANAGER_LISTEN": "127.0.0.1:0",
        "FANOUT_ALLOCATOR_LISTEN": allocator_addr,
        "FANOUT_ALLOCATOR_ADDR": allocator_addr,
        "FANOUT_STAGEMANAGER_METRICS_PORT": "0",
        "FANOUT_ALLOCATOR_METRICS_PORT": "0",
        "FANOUT_CLUSTER_ID": "test",
        "FANOUT_RATE_LIMIT_PER_SECOND": "0",
        "FANOUT_PUBLISHER_KEYS": PUBLISHER_KEY,
        "FANOUT_SHUTDOWN_GRACE_SECONDS": "0.2",
        # Browser fan-out (every Stage an origin the test broadcaster reports publishing on), so a
        # test about scaling or faults needs no publisher in the emulator. Tests of the topology
        # (replicas fed by replication) set these back, and publish for real.
        "FANOUT_DIRECT_STAGES": "200",
        "FANOUT_REPLICAS_PER_ORIGIN": "0",
        # No channel API (moto) beside these tests; the overflow tier's tests turn it on with one.
        "FANOUT_OVERFLOW": "off",
    }
    env.update(overrides)
    return env


def ivs_client(ivs_url: str) -> Any:
    return make_ivs_client("us-east-1", ivs_url, local_credentials=True)


def channel_client(env: Mapping[str, str]) -> Any:
    """The `ivs` (channels) client the stage manager's composition root builds from its settings."""
    settings = read_stagemanager_settings(env)
    return make_ivs_client("us-east-1", settings.channel_endpoint_url, local_credentials=True, service="ivs")


def stagemanager_allocator_channel(address: str) -> grpc.aio.Channel:
    """The in-process stage manager's channel to the allocator, which it dials before the allocator
    listens. Its own subchannels: gRPC shares connections between the channels of one process, and the
    refused connect's backoff (about a second) would hold back every other client of the allocator.
    A short first backoff, so that it connects as soon as the allocator listens."""
    return grpc.aio.insecure_channel(
        address,
        options=[
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.initial_reconnect_backoff_ms", 20),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ],
    )


async def start_stagemanager(
    env: Mapping[str, str],
    registry: CollectorRegistry | None = None,
    allocator_channel: grpc.aio.Channel | None = None,
) -> StageManagerService:
    settings = read_stagemanager_settings(env)
    channel = allocator_channel or stagemanager_allocator_channel(settings.allocator_addr)
    service = await start_stage_manager(
        settings,
        ivs_client(env["FANOUT_IVS_ENDPOINT"]),
        channel_client(env),
        channel,
        registry or CollectorRegistry(),
    )
    service.tasks.append(_close_on_cancel(channel))
    await eventually(lambda: service.rooms.recovered, what="stage manager recovery")
    return service


async def start_allocator_for(
    env: Mapping[str, str], stagemanager_port: int, registry: CollectorRegistry | None = None
) -> AllocatorService:
    settings = read_allocator_settings({**env, "FANOUT_STAGEMANAGER_ADDR": f"127.0.0.1:{stagemanager_port}"})
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{stagemanager_port}")
    service = await start_allocator(
        settings,
        ivs_client(env["FANOUT_IVS_ENDPOINT"]),
        channel,
        registry or CollectorRegistry(),
        open_store(settings),
    )
    service.tasks.append(_close_on_cancel(channel))
    return service


async def wait_until_serving(port: int) -> None:
    """The standard health check, as the gateway's /readyz asks it."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        async def serving() -> bool:
            try:
                response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.aio.AioRpcError:
                return False
            return response.status == health_pb2.HealthCheckResponse.SERVING

        await eventually(serving, what=f"the service on port {port} to serve", within=30)


async def start_gateway(
    env: Mapping[str, str], allocator_addr: str, stagemanager_port: int, registry: CollectorRegistry
) -> tuple[web.AppRunner, str]:
    """The gateway on a free port, as its composition root builds it; its runner and base URL."""
    settings = GatewaySettings.from_env(
        {
            **env,
            "FANOUT_GATEWAY_PORT": "0",
            "FANOUT_ALLOCATOR_ADDR": allocator_addr,
            "FANOUT_STAGEMANAGER_ADDR": f"127.0.0.1:{stagemanager_port}",
        }
    )
    runner = await start_http_server(create_app(settings, registry=registry), settings)
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


def _close_on_cancel(channel: grpc.aio.Channel) -> Any:
    async def wait_then_close() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await channel.close()

    return asyncio.create_task(wait_then_close())


@contextlib.asynccontextmanager
async def running_system(
    state_dir: Path,
    ivs_settings: IvsSettings | None = None,
    ivs_through: FaultProxy | None = None,
    **overrides: str,
) -> AsyncIterator[System]:
    """Emulator, stage manager, allocator and gateway on free loopback ports; env overrides per test.
    With `ivs_through`, the services reach the emulator through that proxy (to make IVS fail)."""
    async with running_ivslocal(ivs_settings) as ivs:
        ivs_url = ivs.url
        if ivs_through is not None:
            ivs_through.target_port = int(ivs.url.rsplit(":", 1)[1])
            ivs_url = ivs_through.url
        env = service_env(ivs_url, state_dir, overrides)
        registries = {name: CollectorRegistry() for name in ("stagemanager", "allocator", "gateway")}
        to_allocator = stagemanager_allocator_channel(env["FANOUT_ALLOCATOR_ADDR"])
        stagemanager = await start_stagemanager(env, registries["stagemanager"], to_allocator)
        allocator = await start_allocator_for(env, stagemanager.port, registries["allocator"])
        await wait_until_serving(allocator.port)
        # Whole only once the stage manager reaches the allocator: until then its autoscaler is blind
        # (no occupancy), and a test's first joins would meet a pool that cannot grow.
        await asyncio.wait_for(to_allocator.channel_ready(), 30)
        runner, gateway_url = await start_gateway(
            env, f"127.0.0.1:{allocator.port}", stagemanager.port, registries["gateway"]
        )
        system = System(
            ivs=ivs,
            env=env,
            stagemanager_service=stagemanager,
            allocator_service=allocator,
            gateway_url=gateway_url,
            publisher_key=PUBLISHER_KEY,
            registries=registries,
        )
        try:
            yield system
        finally:
            await runner.cleanup()
            for channel in system._channels:
                await channel.close()
            await system.allocator_service.stop(0.2)
            await system.stagemanager_service.stop(0.2)


__all__ = ["GatewayClients", "System", "running_system"]
