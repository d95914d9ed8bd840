"""AssignViewers (one stream, many requests) answers exactly as AssignViewer (a call per request) does:
the same placements, and for every failure the same status, details and error metadata, so the gateway's
one gRPC → HTTP map gives both paths the same HTTP answer. A real allocator gRPC server; its core fails
on demand, so every kind of failure is reached in one run."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, cast

import grpc
import pytest
from prometheus_client import CollectorRegistry

from gateway.assign_stream import AssignStream
from gateway.errors import api_error_from_grpc
from protos.fanout.v1 import allocator_pb2, allocator_pb2_grpc
from services.allocator.allocation import Allocator, ViewerPlacement
from services.allocator.servicer import SERVICE_NAME, AllocatorServicer, placement_to_proto
from services.allocator.tokens import IssuedToken
from services.common.errors import (
    ERROR_CODE_METADATA,
    RETRY_AFTER_METADATA,
    FanoutError,
    InvalidArgument,
    NoCapacity,
    NotFound,
    Unavailable,
)
from services.common.grpc_server import GrpcServer, GrpcServerMetrics, start_grpc_server
from tests.integration.waiting import eventually
from tests.ports import free_port

# The allocator's own refusals (allocation.py, store_guard.py, ids.py), by the user id that asks for one.
FAILURES: dict[str, Exception] = {
    "room-not-found": NotFound("room nowhere does not exist", code="room_not_found"),
    "capacity-exhausted": NoCapacity(
        "room main is at its ceiling of 2 viewers (FANOUT_MAX_STAGES_PER_ROOM=2)",
        code="capacity_exhausted",
        retry_after=5,
    ),
    "no-capacity": NoCapacity(
        "room main has no Stage that can take another viewer yet; more are coming",
        code="no_capacity",
        retry_after=5,
    ),
    "invalid-argument": InvalidArgument("userId must be 1-128 characters", code="invalid_user_id"),
    "store-down": Unavailable("the lease store is unreachable", retry_after=1),
    "bug": RuntimeError("something nobody expected"),
}


NOW = datetime(2026, 1, 1, tzinfo=UTC)


def placement(user_id: str) -> ViewerPlacement:
    token = IssuedToken("arn:aws:ivs:us-east-1:123456789012:stage/abc", f"jwt-{user_id}", user_id, NOW)
    return ViewerPlacement("main", user_id, token, lease_seconds=60, sticky=False)


class ScriptedAllocator:
    """The allocator core's assign_viewer: a placement, or the failure the user id names."""

    def __init__(self) -> None:
        self.delay = 0.0

    async def assign_viewer(self, room: str, user_id: str) -> ViewerPlacement:
        await asyncio.sleep(self.delay)
        if user_id in FAILURES:
            raise FAILURES[user_id]
        return placement(user_id)


@contextlib.asynccontextmanager
async def allocator_server(core: ScriptedAllocator) -> AsyncIterator[allocator_pb2_grpc.AllocatorAsyncStub]:
    metrics = GrpcServerMetrics(CollectorRegistry())

    def register(server: grpc.aio.Server) -> None:
        servicer = AllocatorServicer(cast(Allocator, core), metrics)
        allocator_pb2_grpc.add_AllocatorServicer_to_server(servicer, server)

    server = await start_grpc_server("127.0.0.1:0", register, [SERVICE_NAME], metrics)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield cast("allocator_pb2_grpc.AllocatorAsyncStub", allocator_pb2_grpc.AllocatorStub(channel))
    finally:
        await server.stop(0)


def request(user_id: str) -> allocator_pb2.AssignViewerRequest:
    return allocator_pb2.AssignViewerRequest(room="main", user_id=user_id)


def failure(error: grpc.aio.AioRpcError) -> dict[str, Any]:
    """What the gateway reads from a failed call, and the HTTP answer it makes of it."""
    keys = (ERROR_CODE_METADATA, RETRY_AFTER_METADATA)
    metadata = {key: value for key, value in (error.trailing_metadata() or ()) if key in keys}
    answer = api_error_from_grpc(error)
    http = None if answer is None else (answer.status, answer.code, answer.message, answer.headers)
    return {"code": error.code(), "details": error.details(), "metadata": metadata, "http": http}


async def test_every_failure_reaches_the_gateway_as_the_unary_call_would_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR)
    async with allocator_server(ScriptedAllocator()) as stub:
        stream = AssignStream(stub, timeout_seconds=5)
        try:
            for user_id in FAILURES:
                with pytest.raises(grpc.aio.AioRpcError) as unary:
                    await stub.AssignViewer(request(user_id), timeout=5)
                with pytest.raises(grpc.aio.AioRpcError) as streamed:
                    await stream.assign_viewer(request(user_id))
                assert failure(streamed.value) == failure(unary.value), user_id
                expected = FAILURES[user_id]
                if isinstance(expected, FanoutError):
                    assert failure(streamed.value)["metadata"][ERROR_CODE_METADATA] == expected.code
            placed = await stream.assign_viewer(request("viewer"))
        finally:
            await stream.close()
    assert placed == placement_to_proto(placement("viewer"))
    # The unexpected error was logged once per path (unary and stream), with its traceback.
    bugs = [r for r in caplog.records if r.exc_info and "something nobody expected" in str(r.exc_info[1])]
    assert len(bugs) == 2


async def test_answers_reach_their_own_requests_when_many_share_the_stream() -> None:
    async with allocator_server(ScriptedAllocator()) as stub:
        stream = AssignStream(stub, timeout_seconds=5)
        try:
            users = [f"viewer-{i}" if i % 7 else "no-capacity" for i in range(500)]
            answers = await asyncio.gather(
                *(stream.assign_viewer(request(user)) for user in users), return_exceptions=True
            )
        finally:
            await stream.close()
    for user, answer in zip(users, answers, strict=True):
        if user == "no-capacity":
            assert isinstance(answer, grpc.aio.AioRpcError), answer
            assert answer.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        else:
            assert isinstance(answer, allocator_pb2.AssignViewerResponse), answer
            assert (answer.user_id, answer.token.token) == (user, f"jwt-{user}")


async def test_a_request_past_its_deadline_fails_like_a_unary_timeout_and_the_stream_goes_on() -> None:
    core = ScriptedAllocator()
    async with allocator_server(core) as stub:
        stream = AssignStream(stub, timeout_seconds=0.3)
        try:
            core.delay = 1.0
            with pytest.raises(grpc.aio.AioRpcError) as unary:
                await stub.AssignViewer(request("slow"), timeout=0.3)
            with pytest.raises(grpc.aio.AioRpcError) as streamed:
                await stream.assign_viewer(request("slow"))
            core.delay = 0.0
            # The slow answers arrive late and are dropped; the next request has its own answer.
            await asyncio.sleep(1.0)
            placed = await stream.assign_viewer(request("quick"))
        finally:
            await stream.close()
    assert streamed.value.code() == unary.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert failure(streamed.value)["http"] == failure(unary.value)["http"]
    assert placed.user_id == "quick"


async def test_a_request_fails_with_unavailable_when_nothing_listens_as_a_unary_call_does() -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}") as channel:
        gone = cast("allocator_pb2_grpc.AllocatorAsyncStub", allocator_pb2_grpc.AllocatorStub(channel))
        stream = AssignStream(gone, timeout_seconds=5)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as unary:
                await gone.AssignViewer(request("viewer"), timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as streamed:
                await stream.assign_viewer(request("viewer"))
        finally:
            await stream.close()
    assert streamed.value.code() == unary.value.code() == grpc.StatusCode.UNAVAILABLE
    assert failure(streamed.value)["http"] == failure(unary.value)["http"]


class GatedAllocator:
    """An allocator core that holds every placement until its gate opens, and remembers who it placed."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.begun: list[str] = []
        self.placed: set[str] = set()

    async def assign_viewer(self, room: str, user_id: str) -> ViewerPlacement:
        self.begun.append(user_id)
        await self.gate.wait()
        self.placed.add(user_id)
        return placement(user_id)


async def serve(core: GatedAllocator) -> GrpcServer:
    """An allocator gRPC server wired as start_allocator wires it: its servicer ends its streams when
    the server begins to stop."""
    stopping = asyncio.Event()

    def register(server: grpc.aio.Server) -> None:
        servicer = AllocatorServicer(cast(Allocator, core), None, stopping)
        allocator_pb2_grpc.add_AllocatorServicer_to_server(servicer, server)

    return await start_grpc_server("127.0.0.1:0", register, [SERVICE_NAME], None, stopping=stopping)


async def test_a_stopping_allocator_answers_what_it_read_and_the_rest_go_to_another_without_a_503() -> None:
    cores = (GatedAllocator(), GatedAllocator())
    servers = [await serve(core) for core in cores]
    # Two allocators behind one channel, as replicas behind a Service: a new stream may go to either.
    target = f"ipv4:127.0.0.1:{servers[0].port},127.0.0.1:{servers[1].port}"
    channel = grpc.aio.insecure_channel(target, options=[("grpc.lb_policy_name", "round_robin")])
    stream = AssignStream(
        cast("allocator_pb2_grpc.AllocatorAsyncStub", allocator_pb2_grpc.AllocatorStub(channel)), 20
    )
    try:
        await stream.assign_viewer(request("first"))
        holder = 0 if "first" in cores[0].placed else 1
        stopping_core, other_core = cores[holder], cores[1 - holder]
        stopping_core.gate.clear()
        early = [asyncio.create_task(stream.assign_viewer(request(f"early-{i}"))) for i in range(20)]
        await eventually(lambda: len(stopping_core.begun) == 21, "the 20 early requests begun")
        # A rolling update stops this allocator while it holds 20 placements: they finish there...
        stopped = asyncio.create_task(servers[holder].stop(grace=15))
        await eventually(servers[holder].stopping.is_set, "the allocator stopping")
        # ...while these 20 reach a stream it no longer reads.
        late = [asyncio.create_task(stream.assign_viewer(request(f"late-{i}"))) for i in range(20)]
        await asyncio.sleep(0.2)
        stopping_core.gate.set()
        answers = await asyncio.gather(*early, *late)
        # The stream ended by itself once the early ones were answered, long before the grace ran out.
        await asyncio.wait_for(stopped, 5)
    finally:
        await stream.close()
        await channel.close()
        for server in servers:
            await server.stop(0)
    assert [answer.user_id for answer in answers] == [f"early-{i}" for i in range(20)] + [
        f"late-{i}" for i in range(20)
    ]
    assert {f"early-{i}" for i in range(20)} <= stopping_core.placed
    assert {f"late-{i}" for i in range(20)} <= other_core.placed
    assert not any(user.startswith("late-") for user in stopping_core.begun)


async def test_requests_a_stopping_allocator_never_read_fail_at_once_when_no_other_answers() -> None:
    core = GatedAllocator()
    server = await serve(core)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    stream = AssignStream(
        cast("allocator_pb2_grpc.AllocatorAsyncStub", allocator_pb2_grpc.AllocatorStub(channel)), 20
    )
    try:
        await stream.assign_viewer(request("first"))
        core.gate.clear()
        early = asyncio.create_task(stream.assign_viewer(request("early")))
        await eventually(lambda: core.begun == ["first", "early"], "the early request begun")
        stopped = asyncio.create_task(server.stop(grace=15))
        await eventually(server.stopping.is_set, "the allocator stopping")
        late = asyncio.create_task(stream.assign_viewer(request("late")))
        await asyncio.sleep(0.2)
        core.gate.set()
        assert (await early).user_id == "early"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(late, 5)
        await asyncio.wait_for(stopped, 5)
    finally:
        await stream.close()
        await channel.close()
        await server.stop(0)
    # Sent again once, found nothing listening: the unary call's answer (503), not a 20 s deadline.
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert failure(refused.value)["http"][0] == 503
    assert "late" not in core.begun
