"""Viewer assignments over one long-lived AssignViewers stream to the allocator, many requests at once.

A unary call per token costs the gateway and the allocator more CPU than the token's signature (a new
HTTP/2 stream, call objects, metadata, completion-queue hand-offs on both sides); a message on an open
stream costs a fraction of that. Callers see the unary call's behaviour: an answer, or a
grpc.aio.AioRpcError with the status, details and trailing metadata AssignViewer would have failed
with, so the one gRPC → HTTP map (gateway/errors.py) answers both paths alike.

An allocator that stops (a rolling update) ends the stream cleanly once it has answered every request
it read; the requests still waiting were never begun, so they go once more on a new stream, which the
channel opens to an allocator that is not stopping: a rollout costs viewers no 503s.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from protos.fanout.v1 import allocator_pb2, allocator_pb2_grpc
from services.common.errors import ERROR_CODE_METADATA, RETRY_AFTER_METADATA

log = logging.getLogger(__name__)

# Requests waiting for an answer at once, over every stream; past it a request waits for a place
# (within its deadline), so neither the pending map nor the send queue grows without bound.
MAX_PENDING_REQUESTS = 1024

_STATUS_BY_NUMBER = {status.value[0]: status for status in grpc.StatusCode}


def rpc_error(
    status: grpc.StatusCode, details: str, metadata: tuple[tuple[str, str], ...] = ()
) -> grpc.aio.AioRpcError:
    """The error a unary call ending with this status, details and trailing metadata raises."""
    return grpc.aio.AioRpcError(status, grpc.aio.Metadata(), grpc.aio.Metadata(*metadata), details)


def error_from_proto(error: allocator_pb2.RequestError) -> grpc.aio.AioRpcError:
    metadata: list[tuple[str, str]] = []
    if error.error_code:
        metadata.append((ERROR_CODE_METADATA, error.error_code))
    if error.HasField("retry_after_seconds"):
        metadata.append((RETRY_AFTER_METADATA, str(error.retry_after_seconds)))
    status = _STATUS_BY_NUMBER.get(error.status_code, grpc.StatusCode.UNKNOWN)
    return rpc_error(status, error.message, tuple(metadata))


@dataclass(slots=True)
class _Waiting:
    """A request sent and not yet answered, and whether it was already sent again after a clean end."""

    request: allocator_pb2.AssignViewerRequest
    future: asyncio.Future[allocator_pb2.AssignViewerResponse]
    resent: bool = False


class _Stream:
    """One AssignViewers call: a writer task sends queued requests, a reader task settles answers.

    When either fails the stream is over: every request still waiting fails with UNAVAILABLE, as a
    unary call in flight fails when its connection breaks; the next request opens a new stream. When
    the allocator ends it cleanly (it is stopping), the requests still waiting go to `on_drained`.
    """

    def __init__(
        self,
        stub: allocator_pb2_grpc.AllocatorAsyncStub,
        on_drained: Callable[[list[tuple[int, _Waiting]]], None],
    ) -> None:
        self.pending: dict[int, _Waiting] = {}
        self.closed = False
        self._on_drained = on_drained
        self._answered = False
        # Every queued request is pending, and pending requests are bounded: so is this queue.
        self._outbox: asyncio.Queue[allocator_pb2.IdentifiedAssignViewerRequest] = asyncio.Queue()
        self._call: Any = stub.AssignViewers()
        self._tasks = (
            asyncio.create_task(self._write(), name="assign-stream-writer"),
            asyncio.create_task(self._read(), name="assign-stream-reader"),
        )

    def send(self, request_id: int, request: allocator_pb2.AssignViewerRequest) -> None:
        self._outbox.put_nowait(allocator_pb2.IdentifiedAssignViewerRequest(id=request_id, request=request))

    async def _write(self) -> None:
        try:
            while True:
                # Whatever queued up during the last write goes in one message: under load one
                # message (and one completion-queue round trip on each side) carries many requests.
                batch = [await self._outbox.get()]
                while not self._outbox.empty():
                    batch.append(self._outbox.get_nowait())
                await self._call.write(allocator_pb2.AssignViewersRequest(requests=batch))
        except grpc.aio.AioRpcError as error:
            self.close(f"sending on the AssignViewers stream failed with {error.code().name}")
        except Exception as error:
            # e.g. InvalidStateError: the call ended while a request was being written.
            self.close(f"sending on the AssignViewers stream failed: {error!r}")

    async def _read(self) -> None:
        try:
            while True:
                message = await self._call.read()
                if message is grpc.aio.EOF:
                    self._drained()
                    return
                self._answered = True
                for result in message.results:
                    self._settle(result)
        except grpc.aio.AioRpcError as error:
            self.close(f"the AssignViewers stream failed with {error.code().name}")
        except Exception:
            log.exception("reading the AssignViewers stream failed")
            self.close("reading the AssignViewers stream failed")

    def _settle(self, result: allocator_pb2.AssignViewerResult) -> None:
        waiting = self.pending.pop(result.id, None)
        # None: the request's caller gave up (its deadline, or it went away) before the answer came.
        if waiting is None or waiting.future.done():
            return
        future = waiting.future
        if result.HasField("error"):
            future.set_exception(error_from_proto(result.error))
        else:
            future.set_result(result.response)

    def close(self, reason: str) -> None:
        """Ends the stream; every request still waiting fails as a broken unary call would."""
        if self.closed:
            return
        self.closed = True
        # A stream that never got going (the allocator is down) is no news: the error middleware
        # already logs each request it fails.
        if self._answered and self.pending:
            log.warning("%s; failing %d waiting requests", reason, len(self.pending))
        elif self._answered:
            log.info("%s", reason)
        else:
            log.debug("%s; failing %d waiting requests", reason, len(self.pending))
        self._stop_tasks()
        for waiting in self.pending.values():
            if not waiting.future.done():
                waiting.future.set_exception(rpc_error(grpc.StatusCode.UNAVAILABLE, reason))
        self.pending.clear()

    def _drained(self) -> None:
        """The allocator ended the stream with OK: it stops, and answered every request it had read
        (services/common/grpc_server.py answer_each), so those still waiting were never begun."""
        if self.closed:
            return
        self.closed = True
        self._stop_tasks()
        waiting = [(request_id, w) for request_id, w in self.pending.items() if not w.future.done()]
        self.pending.clear()
        self._on_drained(waiting)

    def _stop_tasks(self) -> None:
        self._call.cancel()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)


class AssignStream:
    """AssignViewer through one shared stream per allocator channel, opened on first use and again
    after it fails; each request has its own deadline, like the unary call it replaces."""

    def __init__(self, stub: allocator_pb2_grpc.AllocatorAsyncStub, timeout_seconds: float) -> None:
        self._stub = stub
        self._timeout = timeout_seconds
        self._ids = itertools.count(1)
        self._places = asyncio.Semaphore(MAX_PENDING_REQUESTS)
        self._stream: _Stream | None = None

    async def assign_viewer(
        self, request: allocator_pb2.AssignViewerRequest
    ) -> allocator_pb2.AssignViewerResponse:
        """The allocator's answer, or the grpc.aio.AioRpcError the unary AssignViewer would raise
        (DEADLINE_EXCEEDED when no answer came within the deadline)."""
        try:
            async with asyncio.timeout(self._timeout), self._places:
                stream = self._open_stream()
                request_id = next(self._ids)
                waiting = _Waiting(request, asyncio.get_running_loop().create_future())
                stream.pending[request_id] = waiting
                try:
                    stream.send(request_id, request)
                    return await waiting.future
                finally:
                    stream.pending.pop(request_id, None)
                    # Sent again on a newer stream, if its first one ended cleanly meanwhile.
                    if self._stream is not None:
                        self._stream.pending.pop(request_id, None)
        except TimeoutError:
            raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None

    def _open_stream(self) -> _Stream:
        if self._stream is None or self._stream.closed:
            self._stream = _Stream(self._stub, self._send_again)
        return self._stream

    def _send_again(self, waiting: list[tuple[int, _Waiting]]) -> None:
        """Sends the requests a stopping allocator never read on a new stream, each at most once more
        (an allocator that ends every stream at once must not keep a request circling)."""
        again = [(request_id, w) for request_id, w in waiting if not w.resent]
        for _, w in waiting:
            if w.resent:
                reason = "the allocator ended the AssignViewers stream twice"
                w.future.set_exception(rpc_error(grpc.StatusCode.UNAVAILABLE, reason))
        log.info(
            "the allocator ended the AssignViewers stream (it is stopping); %d waiting request(s) sent "
            "again on a new one",
            len(again),
        )
        if not again:
            return
        stream = self._open_stream()
        for request_id, w in again:
            w.resent = True
            stream.pending[request_id] = w
            stream.send(request_id, w.request)

    async def close(self) -> None:
        """Ends the stream (requests still waiting fail with UNAVAILABLE); before the channel closes."""
        if self._stream is not None:
            self._stream.close("the gateway is stopping")
            await self._stream.wait_closed()
            self._stream = None
