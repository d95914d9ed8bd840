"""A lean HTTP/1.1 POST pool for the open-loop generator: keep-alive connections, one request each.

The generator shares the two cores with the system it measures, so its CPU per request is taken from the
system's. aiohttp's client spends about 350 µs a request in the open loop (a task, a context manager and
a response object each); this pool writes prebuilt bytes to a uvloop transport and reads the answer with
httptools (the llhttp parser uvicorn uses), about a tenth of that.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

import httptools

# Called once per request: None when the answer was 200, else a short reason (the status, or the
# failure's name).
Done = Callable[[str | None], None]


class PostRequests:
    """Prebuilt POST requests to one URL, differing only in their JSON body."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"need an http://host:port/ URL, not {url!r}")
        self.host, self.port = parts.hostname, parts.port
        path = parts.path or "/"
        self._head = (
            f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
            "Content-Length: "
        ).encode("ascii")

    def encode(self, body: bytes) -> bytes:
        return self._head + str(len(body)).encode("ascii") + b"\r\n\r\n" + body


class _Connection(asyncio.Protocol):
    """One keep-alive connection: at most one request in flight, its answer parsed as it arrives."""

    def __init__(self, pool: LeanPostPool) -> None:
        self._pool = pool
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._done: Done | None = None

    def send(self, request: bytes, done: Done) -> None:
        assert self._transport is not None and self._done is None
        self._done = done
        self._transport.write(request)

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, though they are one in all but name.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._finish("HttpParserError")
            if self._transport is not None:
                self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._finish("ConnectionLost")
        self._pool._lost(self)

    # httptools callbacks
    def on_message_complete(self) -> None:
        status = self._parser.get_status_code()
        self._finish(None if status == 200 else str(status))
        if self._transport is not None and self._parser.should_keep_alive():
            self._pool._idle(self)
        elif self._transport is not None:
            self._transport.close()

    def _finish(self, outcome: str | None) -> None:
        done, self._done = self._done, None
        if done is not None:
            done(outcome)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class LeanPostPool:
    """Sends each request on an idle connection, opens one more (up to `max_connections`) when none is,
    and else queues it: a queued request's wait is part of its latency, as the caller times it."""

    def __init__(self, url: str, max_connections: int) -> None:
        self._requests = PostRequests(url)
        self._max = max_connections
        self._open = 0  # connected or connecting
        self._connections: set[_Connection] = set()
        self._idle_connections: list[_Connection] = []
        self._queued: deque[tuple[bytes, Done]] = deque()

    def post(self, body: bytes, done: Done) -> None:
        request = self._requests.encode(body)
        if self._idle_connections:
            self._idle_connections.pop().send(request, done)
            return
        self._queued.append((request, done))
        self._connect_if_needed()

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await loop.create_connection(
                lambda: _Connection(self), self._requests.host, self._requests.port
            )
        except OSError as error:
            self._open -= 1
            if self._queued:
                # The oldest request fails for want of a connection; the next queued one tries again.
                _, done = self._queued.popleft()
                done(type(error).__name__)
                self._connect_if_needed()
            return
        self._connections.add(connection)
        self._idle(connection)

    def _connect_if_needed(self) -> None:
        if self._queued and self._open < self._max:
            self._open += 1
            asyncio.get_running_loop().create_task(self._connect())

    def _idle(self, connection: _Connection) -> None:
        if self._queued:
            request, done = self._queued.popleft()
            connection.send(request, done)
        else:
            self._idle_connections.append(connection)

    def _lost(self, connection: _Connection) -> None:
        self._open -= 1
        self._connections.discard(connection)
        if connection in self._idle_connections:
            self._idle_connections.remove(connection)
        self._connect_if_needed()

    def close(self) -> None:
        """Closes every connection; a request still in flight is answered "ConnectionLost"."""
        self._queued.clear()
        for connection in list(self._connections):
            connection.close()
