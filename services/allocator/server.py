"""Assembles the allocator: token minter, lease store, inventory watcher, reaper and gRPC server."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from protos.fanout.v1 import allocator_pb2_grpc, stagemanager_pb2_grpc
from services.allocator.allocation import Allocator
from services.allocator.config import AllocatorSettings
from services.allocator.inventory import StageInventory
from services.allocator.ivs import IvsTokenApi
from services.allocator.metrics import AllocatorMetrics
from services.allocator.overflow_seats import OVERFLOW_SEAT, OverflowSeats
from services.allocator.redis_store import open_redis_store
from services.allocator.servicer import SERVICE_NAME, AllocatorServicer
from services.allocator.signing_key import load_or_create_private_key, load_private_key
from services.allocator.store import LeaseStore, MemoryLeaseStore, WatchedLeaseStore
from services.allocator.tokens import ApiMinter, SelfSignedMinter, TokenMinter
from services.allocator.watcher import InventoryWatcher
from services.common.errors import FanoutError, Unavailable
from services.common.grpc_server import GrpcServer, GrpcServerMetrics, start_grpc_server
from services.common.ivs_calls import CallBudget, IvsCaller, IvsMetrics
from services.common.jwt_es384 import public_key_pem
from services.common.lifecycle import cancel_and_wait

log = logging.getLogger(__name__)

REAP_INTERVAL_SECONDS = 1.0


@dataclass
class AllocatorService:
    grpc: GrpcServer
    allocator: Allocator
    store: LeaseStore
    caller: IvsCaller
    tasks: list[asyncio.Task[None]]
    overflow: OverflowSeats

    @property
    def port(self) -> int:
        return self.grpc.port

    async def stop(self, grace: float) -> None:
        # gRPC first: the requests in flight are answered while the inventory watcher and the reaper
        # still run, so they are placed on current Stages. The stage manager stops the other way round.
        await self.grpc.stop(grace)
        await cancel_and_wait(self.tasks)
        await self.store.close()
        await self.overflow.close()
        self.caller.close()


async def build_minter(settings: AllocatorSettings, token_api: IvsTokenApi) -> TokenMinter:
    """The token minter; with a signing key, waits (retrying) until IVS knows its public half."""
    if not settings.self_signed or settings.signing_key_file is None:
        log.info("minting tokens with CreateParticipantToken (no signing key configured)")
        return ApiMinter(token_api.create_participant_token)
    if settings.ivs.mode == "local":
        key = load_or_create_private_key(settings.signing_key_file)
    else:
        key = load_private_key(settings.signing_key_file)
    delay = 1.0
    while True:
        try:
            kid = await token_api.ensure_public_key(
                public_key_pem(key), name="fanout-token-signing", reclaim_stale=settings.ivs.mode == "local"
            )
            break
        except Unavailable as error:
            # Without the key in IVS no token would be accepted: keep trying rather than serve.
            log.warning("%s; retrying in %.0f s", error.message, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
    log.info("minting self-signed ES384 tokens (kid %s)", kid)
    return SelfSignedMinter(key, kid)


def open_store(settings: AllocatorSettings, tier: str = "") -> WatchedLeaseStore:
    """The configured lease store; a Redis client is created only for the Redis store. With `tier`,
    the store of that tier's seats, in a namespace of its own (overflow_seats.py)."""
    if settings.store == "redis" and settings.redis_url:
        namespace = f"{settings.cluster_id}:{tier}" if tier else settings.cluster_id
        return open_redis_store(settings.redis_url, namespace)
    return MemoryLeaseStore()


async def start_allocator(
    settings: AllocatorSettings,
    ivs_client: Any,
    stagemanager_channel: grpc.aio.Channel,
    registry: CollectorRegistry,
    store: WatchedLeaseStore,
) -> AllocatorService:
    """Serves at once (NOT_SERVING) and becomes SERVING with the first inventory snapshot (and, with
    the Redis store, once Redis answers). `store` is the viewers' lease store (`open_store`)."""
    caller = IvsCaller(ivs_client, CallBudget(), IvsMetrics(registry))
    minter = await build_minter(settings, IvsTokenApi(caller))
    inventory = StageInventory()
    metrics = AllocatorMetrics(registry, settings.placement.soft_capacity, settings.placement.hard_limit)
    overflow = OverflowSeats(open_store(settings, OVERFLOW_SEAT))
    allocator = Allocator(inventory, store, minter, settings.placement, metrics, overflow)
    watcher = InventoryWatcher(
        stagemanager_pb2_grpc.StageManagerStub(stagemanager_channel), inventory, allocator
    )

    grpc_metrics = GrpcServerMetrics(registry)
    stopping = asyncio.Event()

    def register(server: grpc.aio.Server) -> None:
        servicer = AllocatorServicer(allocator, grpc_metrics, stopping)
        allocator_pb2_grpc.add_AllocatorServicer_to_server(servicer, server)

    server = await start_grpc_server(
        settings.listen, register, [SERVICE_NAME], grpc_metrics, serving=False, stopping=stopping
    )
    tasks = [
        asyncio.create_task(watcher.run()),
        asyncio.create_task(_serve_when_ready(watcher, server, store, metrics)),
        asyncio.create_task(_reap_forever(allocator)),
    ]
    return AllocatorService(server, allocator, store, caller, tasks, overflow)


async def _serve_when_ready(
    watcher: InventoryWatcher, server: GrpcServer, store: WatchedLeaseStore, metrics: AllocatorMetrics
) -> None:
    """SERVING once the inventory is in and while the lease store answers: without either no viewer
    can be placed. The store's health is followed (and exported) from the start."""
    store_up = False

    async def follow_store(healthy: bool) -> None:
        nonlocal store_up
        store_up = healthy
        metrics.store_up.set(1 if healthy else 0)
        await server.set_serving(healthy and watcher.ready.is_set())

    watching = asyncio.create_task(store.watch(follow_store))
    try:
        await watcher.ready.wait()
        await server.set_serving(store_up)
        await watching  # the in-process store's watch ends at once: it is never down
    finally:
        watching.cancel()


async def _reap_forever(allocator: Allocator) -> None:
    """Ends expired leases and refreshes the occupancy gauges, once a second."""
    while True:
        await asyncio.sleep(REAP_INTERVAL_SECONDS)
        try:
            await allocator.reap_expired()
            await allocator.refresh_metrics()
        except FanoutError:
            pass  # the store's outage is logged once where it is detected; reaping resumes after it
        except Exception:
            log.exception("lease reaping failed; retrying")
