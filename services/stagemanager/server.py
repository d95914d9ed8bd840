"""Assembles the stage manager: inventory, room manager, gRPC server, and inventory recovery."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from protos.fanout.v1 import allocator_pb2_grpc, stagemanager_pb2, stagemanager_pb2_grpc
from services.common.errors import FanoutError
from services.common.grpc_server import GrpcServer, GrpcServerMetrics, start_grpc_server
from services.common.ivs_calls import CallBudget, IvsCaller, IvsMetrics
from services.common.lifecycle import cancel_and_wait
from services.stagemanager.autoscaler import Autoscaler
from services.stagemanager.config import StageManagerSettings
from services.stagemanager.inventory import Inventory
from services.stagemanager.ivs import ReplicationApi, StageApi
from services.stagemanager.metrics import StageManagerMetrics, follow_inventory
from services.stagemanager.occupancy import AllocatorOccupancy
from services.stagemanager.replication import Replicator
from services.stagemanager.rooms import RoomManager
from services.stagemanager.servicer import StageManagerServicer

log = logging.getLogger(__name__)

SERVICE_NAME = stagemanager_pb2.DESCRIPTOR.services_by_name["StageManager"].full_name


@dataclass
class StageManagerService:
    grpc: GrpcServer
    rooms: RoomManager
    inventory: Inventory
    caller: IvsCaller
    tasks: list[asyncio.Task[None]]

    @property
    def port(self) -> int:
        return self.grpc.port

    async def stop(self, grace: float) -> None:
        await cancel_and_wait(self.tasks)
        await self.grpc.stop(grace)
        await self.rooms.close()
        self.caller.close()


async def start_stage_manager(
    settings: StageManagerSettings,
    ivs_client: Any,
    allocator_channel: grpc.aio.Channel,
    registry: CollectorRegistry,
) -> StageManagerService:
    """Starts serving at once (NOT_SERVING) and becomes SERVING when the inventory is recovered."""
    caller = IvsCaller(ivs_client, CallBudget(), IvsMetrics(registry))
    inventory = Inventory()
    metrics = StageManagerMetrics(registry)
    rooms = RoomManager(inventory, StageApi(caller), settings.rooms, metrics)
    replicator = Replicator(rooms, inventory, ReplicationApi(caller), settings.rooms, metrics)
    servicer = StageManagerServicer(rooms, inventory)
    occupancy = AllocatorOccupancy(allocator_pb2_grpc.AllocatorStub(allocator_channel))
    autoscaler = Autoscaler(rooms, inventory, occupancy, settings.autoscaler, metrics)

    def register(server: grpc.aio.Server) -> None:
        stagemanager_pb2_grpc.add_StageManagerServicer_to_server(servicer, server)

    server = await start_grpc_server(
        settings.listen, register, [SERVICE_NAME], GrpcServerMetrics(registry), serving=False
    )
    tasks = [
        asyncio.create_task(_recover_until_done(rooms, server)),
        asyncio.create_task(follow_inventory(inventory, metrics, settings.rooms.limits)),
        asyncio.create_task(autoscaler.run()),
        asyncio.create_task(replicator.run()),
    ]
    return StageManagerService(server, rooms, inventory, caller, tasks)


async def _recover_until_done(rooms: RoomManager, server: GrpcServer) -> None:
    delay = 0.5
    while True:
        try:
            await rooms.recover()
            break
        except FanoutError as error:
            log.warning("inventory recovery failed (%s); retrying in %.1fs", error.message, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 15.0)
    await server.set_serving(True)
