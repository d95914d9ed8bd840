"""Assembles the stage manager: inventory, room manager, gRPC server, and inventory recovery."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from prometheus_client import CollectorRegistry
from redis.exceptions import RedisError

from protos.fanout.v1 import allocator_pb2_grpc, stagemanager_pb2, stagemanager_pb2_grpc
from services.common.errors import FanoutError
from services.common.grpc_server import GrpcServer, GrpcServerMetrics, start_grpc_server
from services.common.ivs_calls import CallBudget, IvsCaller, IvsMetrics
from services.common.ivs_quotas import CHANNEL_OPERATION_RATES
from services.common.lifecycle import cancel_and_wait
from services.common.redis_clients import open_redis
from services.common.timeouts import STORE_CALL_SECONDS
from services.stagemanager import shared_inventory
from services.stagemanager.autoscaler import Autoscaler
from services.stagemanager.channels import ChannelApi
from services.stagemanager.config import StageManagerSettings
from services.stagemanager.forwarding import LeaderRoute
from services.stagemanager.inventory import Inventory
from services.stagemanager.ivs import CompositionApi, ReplicationApi, StageApi
from services.stagemanager.leadership import LeaderLease, Leadership, SoleReplica, fence_ivs_changes
from services.stagemanager.metrics import StageManagerMetrics, follow_inventory
from services.stagemanager.occupancy import AllocatorOccupancy
from services.stagemanager.overflow import OverflowManager
from services.stagemanager.replication import Replicator
from services.stagemanager.rooms import RoomManager
from services.stagemanager.servicer import StageManagerServicer
from services.stagemanager.shared_inventory import InventoryFollower, InventoryMirror, namespace
from services.webhooks.service import start_webhooks

log = logging.getLogger(__name__)

T = TypeVar("T")

SERVICE_NAME = stagemanager_pb2.DESCRIPTOR.services_by_name["StageManager"].full_name


@dataclass
class StageManagerService:
    grpc: GrpcServer
    rooms: RoomManager
    inventory: Inventory
    caller: IvsCaller
    channel_caller: IvsCaller
    tasks: list[asyncio.Task[None]]
    # Set when this process must end: it led and lost the lease (a fresh start rejoins as a follower).
    must_exit: asyncio.Event = field(default_factory=asyncio.Event)
    route: LeaderRoute | None = None
    lease: LeaderLease | None = None
    redis: Any = None

    @property
    def port(self) -> int:
        return self.grpc.port

    async def stop(self, grace: float) -> None:
        # Its tasks first: the autoscaler, replicator and overflow stop acting on IVS and the lease is
        # handed over before gRPC drains, so a successor can take over at once instead of after the
        # drain. The allocator and the monitor drain gRPC first (their tasks keep answers current).
        await cancel_and_wait(self.tasks)
        if self.lease is not None and not self.must_exit.is_set():
            await self.lease.release()
        await self.grpc.stop(grace)
        await self.rooms.close()
        if self.route is not None:
            await self.route.close()
        if self.redis is not None:
            await self.redis.aclose()
        self.caller.close()
        self.channel_caller.close()


async def start_stage_manager(
    settings: StageManagerSettings,
    ivs_client: Any,
    channel_client: Any,
    allocator_channel: grpc.aio.Channel,
    registry: CollectorRegistry,
) -> StageManagerService:
    """Starts serving at once (NOT_SERVING) and becomes SERVING when the inventory is whole: recovered
    from IVS (one replica, or the leader), or loaded from Redis (a follower)."""
    metrics = StageManagerMetrics(registry)
    lease: LeaderLease | None = None
    client = None
    leadership: Leadership = SoleReplica()
    if settings.shared is not None:
        client = open_redis(settings.shared.redis_url, STORE_CALL_SECONDS)
        lease = LeaderLease(
            client,
            namespace(settings.rooms.cluster_id),
            holder=f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}",
            address=settings.shared.advertise_address,
            ttl_seconds=settings.shared.lease_seconds,
        )
        leadership = lease
    ivs_metrics = IvsMetrics(registry)
    guard = fence_ivs_changes(leadership)
    caller = IvsCaller(ivs_client, CallBudget(), ivs_metrics, guard=guard)
    # The `ivs` service (the overflow tier's channels) has its own quotas, and the same fence.
    channel_caller = IvsCaller(channel_client, CallBudget(CHANNEL_OPERATION_RATES), ivs_metrics, guard=guard)
    inventory = Inventory()
    occupancy = AllocatorOccupancy(allocator_pb2_grpc.AllocatorStub(allocator_channel))
    # The overflow tier and the webhooks poll less often than the autoscaler: its answer does for them.
    recent_occupancy = occupancy.recent(max_age=2.0)
    overflow = OverflowManager(
        inventory,
        ChannelApi(channel_caller, settings.playback_url_template),
        CompositionApi(caller),
        settings.overflow,
        settings.rooms.cluster_id,
        metrics,
        occupancy=recent_occupancy,
    )
    rooms = RoomManager(inventory, StageApi(caller), settings.rooms, metrics, overflow=overflow)
    replicator = Replicator(rooms, inventory, ReplicationApi(caller), settings.rooms, metrics)
    route = LeaderRoute(leadership, inventory, lease)
    servicer = StageManagerServicer(rooms, inventory, route)
    autoscaler = Autoscaler(rooms, inventory, occupancy, settings.autoscaler, metrics)

    def register(server: grpc.aio.Server) -> None:
        stagemanager_pb2_grpc.add_StageManagerServicer_to_server(servicer, server)

    server = await start_grpc_server(
        settings.listen, register, [SERVICE_NAME], GrpcServerMetrics(registry), serving=False
    )
    service = StageManagerService(
        server, rooms, inventory, caller, channel_caller, [], route=route, lease=lease, redis=client
    )

    def act() -> list[asyncio.Task[None]]:
        """What only the leader does, once its inventory agrees with IVS."""
        return [
            asyncio.create_task(autoscaler.run()),
            asyncio.create_task(replicator.run()),
            asyncio.create_task(overflow.run()),
            *start_webhooks(settings.webhooks, inventory, recent_occupancy, settings.rooms.limits, registry),
        ]

    service.tasks.append(
        asyncio.create_task(
            follow_inventory(inventory, metrics, settings.rooms.limits, lambda: leadership.is_leader)
        )
    )
    if lease is None or client is None:
        metrics.leader.set(1)

        async def recover_then_act() -> None:
            await _recover_until_done(rooms, server)
            service.tasks.extend(act())

        service.tasks.append(asyncio.create_task(recover_then_act()))
    else:
        service.tasks.append(
            asyncio.create_task(
                _lead_or_follow(
                    service, lease, client, settings.rooms.cluster_id, inventory, rooms, server, metrics, act
                )
            )
        )
    return service


async def _lead_or_follow(
    service: StageManagerService,
    lease: LeaderLease,
    client: Any,
    cluster_id: str,
    inventory: Inventory,
    rooms: RoomManager,
    server: GrpcServer,
    metrics: StageManagerMetrics,
    act: Callable[[], list[asyncio.Task[None]]],
) -> None:
    """Follows the leader's inventory (serving reads) until this replica wins the lease, then takes
    over: replays what the old leader wrote last, reconciles with IVS, and acts. The process ends when
    the lease is lost (`_end_when_lease_lost`)."""
    follower = InventoryFollower(client, cluster_id, inventory)
    await _until_redis_answers(follower.load, "cannot read the shared inventory")
    rooms.mark_readable()
    await server.set_serving(True)
    following = asyncio.create_task(follower.run())
    campaign = asyncio.create_task(lease.run())
    service.tasks.extend(
        [following, campaign, asyncio.create_task(_end_when_lease_lost(service, lease, metrics))]
    )
    await lease.became_leader.wait()
    await cancel_and_wait([following])
    started = time.monotonic()
    # A Redis call that fails here (a slow answer is a timeout) is tried again: left to end this task,
    # it would leave a leader that holds the lease and never acts.
    await _until_redis_answers(follower.catch_up, "cannot replay the old leader's last changes")
    mirror = InventoryMirror(client, cluster_id, inventory, lease)
    service.tasks.append(asyncio.create_task(mirror.run()))
    if not await _until_redis_answers(follower.leader_wrote_state, "cannot read the shared inventory"):
        # No leader wrote an inventory yet (or Redis lost it): the whole of it is rebuilt from IVS and
        # written afresh, so followers load a state that matches it.
        await _until_redis_answers(
            lambda: shared_inventory.clear(client, cluster_id), "cannot clear the shared inventory"
        )
        # Revisions from the wall clock, as a lone stage manager's (they keep increasing over restarts).
        inventory.load([], time.time_ns() // 1_000)
    metrics.leader.set(1)
    metrics.leadership_acquired.inc()
    await _recover_until_done(rooms, server)
    log.info("took over as leader in %.1f s", time.monotonic() - started)
    service.tasks.extend(act())


async def _end_when_lease_lost(
    service: StageManagerService, lease: LeaderLease, metrics: StageManagerMetrics
) -> None:
    """Also in the middle of a takeover (which may be waiting for Redis)."""
    await lease.lost.wait()
    metrics.leader.set(0)
    log.error("this replica no longer leads; ending the process so that it restarts as a follower")
    service.must_exit.set()


async def _until_redis_answers(call: Callable[[], Awaitable[T]], failure: str) -> T:
    delay = 0.5
    while True:
        try:
            return await call()
        except (RedisError, OSError) as error:
            log.warning("%s (%s); retrying in %.1fs", failure, error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


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
