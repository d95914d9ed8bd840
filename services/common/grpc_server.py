"""Builds grpc.aio servers: one interceptor maps domain errors to status codes and counts every call."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Counter, Histogram

from services.common.errors import ERROR_CODE_METADATA, RETRY_AFTER_METADATA, ErrorKind, FanoutError

log = logging.getLogger(__name__)

RequestT = TypeVar("RequestT")
AnswerT = TypeVar("AnswerT")

_STATUS_BY_KIND = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.NO_CAPACITY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}


class GrpcServerMetrics:
    """gRPC server calls, codes and latency, the same for every service."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.handled = Counter(
            "fanout_grpc_server_handled",
            "gRPC calls completed by the server, by method and status code.",
            ["grpc_service", "grpc_method", "grpc_code"],
            registry=registry,
        )
        self.latency = Histogram(
            "fanout_grpc_server_handling_seconds",
            "Time to complete a unary gRPC call (streams: time to the first message).",
            ["grpc_service", "grpc_method"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )

    def record(self, service: str, method: str, code: grpc.StatusCode, started: float | None) -> None:
        """One call ended with `code`; its latency too when `started` (a perf_counter) is given."""
        self.handled.labels(service, method, code.name).inc()
        if started is not None:
            self.latency.labels(service, method).observe(time.perf_counter() - started)


def _split_method(full_method: str) -> tuple[str, str]:
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


def status_for(error: FanoutError) -> grpc.StatusCode:
    """The status a call that raised `error` ends with (also each failed request of a multiplexed stream)."""
    return _STATUS_BY_KIND[error.kind]


async def _abort_for(context: grpc.aio.ServicerContext, error: FanoutError) -> None:
    metadata: list[tuple[str, str]] = [(ERROR_CODE_METADATA, error.code)]
    if error.retry_after is not None:
        metadata.append((RETRY_AFTER_METADATA, str(error.retry_after)))
    await context.abort(status_for(error), error.message, trailing_metadata=tuple(metadata))


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """The one place a service's domain errors become gRPC statuses; unexpected errors become INTERNAL."""

    def __init__(self, metrics: GrpcServerMetrics | None = None) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        service, method = _split_method(handler_call_details.method)
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._wrap_unary(handler.unary_unary, service, method))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._wrap_stream(handler.unary_stream, service, method))
        if handler.stream_stream is not None:
            return handler._replace(stream_stream=self._wrap_stream(handler.stream_stream, service, method))
        return handler

    def _record(self, service: str, method: str, code: grpc.StatusCode, started: float | None) -> None:
        if self._metrics is not None:
            self._metrics.record(service, method, code, started)

    def _wrap_unary(self, behaviour: Any, service: str, method: str) -> Any:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            try:
                response = await behaviour(request, context)
            except FanoutError as error:
                self._record(service, method, status_for(error), started)
                await _abort_for(context, error)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                self._record(service, method, context.code() or grpc.StatusCode.CANCELLED, started)
                raise
            except Exception:
                log.exception("unexpected error in %s/%s", service, method)
                self._record(service, method, grpc.StatusCode.INTERNAL, started)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")
            self._record(service, method, grpc.StatusCode.OK, started)
            return response

        return wrapped

    def _wrap_stream(self, behaviour: Any, service: str, method: str) -> Any:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started: float | None = time.perf_counter()
            try:
                responses = behaviour(request, context)
                if inspect.isawaitable(responses):
                    # A handler that answers with context.write() (grpc's health Watch) is a coroutine.
                    await responses
                else:
                    async for message in responses:
                        if started is not None:
                            self._record_first(service, method, started)
                            started = None
                        yield message
            except FanoutError as error:
                self._record(service, method, status_for(error), None)
                await _abort_for(context, error)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                self._record(service, method, context.code() or grpc.StatusCode.CANCELLED, None)
                raise
            except Exception:
                log.exception("unexpected error in %s/%s", service, method)
                self._record(service, method, grpc.StatusCode.INTERNAL, None)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")
            else:
                self._record(service, method, grpc.StatusCode.OK, None)

        return wrapped

    def _record_first(self, service: str, method: str, started: float) -> None:
        if self._metrics is not None:
            self._metrics.latency.labels(service, method).observe(time.perf_counter() - started)


@dataclass(frozen=True)
class RequestFailure:
    """How a unary call would have ended: its status, details and error metadata."""

    status: grpc.StatusCode
    message: str
    error_code: str = ""
    retry_after: int | None = None


async def answer_each(
    batches: AsyncIterator[Iterable[RequestT]],
    handle: Callable[[RequestT], Awaitable[AnswerT]],
    failed: Callable[[RequestT, RequestFailure], AnswerT],
    *,
    limit: int,
    metrics: GrpcServerMetrics | None,
    service: str,
    method: str,
    stopping: asyncio.Event | None = None,
) -> AsyncIterator[list[AnswerT]]:
    """Many unary requests over one stream, arriving in batches: each handled in a task of its own (at
    most `limit` at once, then reading waits), and the answers ready at the same time yielded together
    as soon as they are. A request that fails gets `failed(request, ...)` with what the interceptor
    would have ended its unary call with, and the stream goes on; `metrics` counts each request as a
    call of `method`.

    Once `stopping` is set (the server is shutting down) no further request is read: the stream ends,
    with OK, as soon as every request read is answered. Every request left unanswered then was never
    begun, so the caller may send it again elsewhere (gateway/assign_stream.py does)."""
    answers: asyncio.Queue[AnswerT | None] = asyncio.Queue()
    # Taken when a request is read, given back when its answer is yielded: bounds tasks and queue.
    slots = asyncio.Semaphore(limit)
    handling: set[asyncio.Task[None]] = set()

    def record(code: grpc.StatusCode, started: float) -> None:
        if metrics is not None:
            metrics.record(service, method, code, started)

    async def answer(request: RequestT) -> None:
        started = time.perf_counter()
        try:
            result = await handle(request)
        except FanoutError as error:
            status = status_for(error)
            record(status, started)
            result = failed(request, RequestFailure(status, error.message, error.code, error.retry_after))
        except Exception:
            log.exception("unexpected error in %s/%s", service, method)
            record(grpc.StatusCode.INTERNAL, started)
            result = failed(request, RequestFailure(grpc.StatusCode.INTERNAL, "internal error"))
        else:
            record(grpc.StatusCode.OK, started)
        answers.put_nowait(result)

    async def read_requests() -> None:
        async for batch in batches:
            for request in batch:
                await slots.acquire()
                task = asyncio.create_task(answer(request))
                handling.add(task)
                task.add_done_callback(handling.discard)

    async def read() -> None:
        try:
            await _until_set(read_requests(), stopping)
            # The caller closed its side, or the server is stopping: the stream ends once every
            # request read is answered.
            await asyncio.gather(*handling)
        finally:
            answers.put_nowait(None)

    reader = asyncio.create_task(read())
    try:
        ended = False
        while not ended:
            ready: list[AnswerT] = []
            result = await answers.get()
            while True:
                if result is None:
                    ended = True
                    break
                ready.append(result)
                if answers.empty():
                    break
                result = answers.get_nowait()
            if ready:
                for _ in ready:
                    slots.release()
                yield ready
        await reader  # a failed read ends the stream with its error
    finally:
        reader.cancel()
        for task in handling:
            task.cancel()
        await asyncio.gather(reader, *handling, return_exceptions=True)


async def _until_set(work: Coroutine[Any, Any, None], event: asyncio.Event | None) -> None:
    """Runs `work` to its end, or until `event` is set, then cancels it; its error, if any, is raised."""
    if event is None:
        await work
        return
    running = asyncio.ensure_future(work)
    setting = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait((running, setting), return_when=asyncio.FIRST_COMPLETED)
    finally:
        setting.cancel()
        if not running.done():
            running.cancel()
            # Waited for without raising its cancellation: only a cancellation of this task propagates.
            await asyncio.wait((running,))
    if not running.cancelled():
        running.result()


@dataclass
class GrpcServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    # Set when stop() begins: long-lived streams (answer_each) stop reading and end on their own
    # instead of being cut off when the grace period runs out.
    stopping: asyncio.Event

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set("", status)

    async def stop(self, grace: float) -> None:
        self.stopping.set()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_grpc_server(
    address: str,
    register: Callable[[grpc.aio.Server], None],
    service_names: Sequence[str],
    metrics: GrpcServerMetrics | None,
    serving: bool = True,
    stopping: asyncio.Event | None = None,
) -> GrpcServer:
    """Starts a server with health and reflection; returns the bound port so tests can pass port 0.
    `stopping` (made here when not given) is set when the server begins to stop; pass one to give it to
    servicers registered before the server exists."""
    server = grpc.aio.server(
        interceptors=[ErrorMappingInterceptor(metrics)],
        options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 8 * 1024 * 1024)],
    )
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind gRPC server to {address}")
    await server.start()
    grpc_server = GrpcServer(
        server=server,
        port=port,
        health=health_servicer,
        stopping=asyncio.Event() if stopping is None else stopping,
    )
    await grpc_server.set_serving(serving)
    return grpc_server
