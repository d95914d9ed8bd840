"""A TCP proxy in front of a dependency, to make it vanish or hang on demand in a running system."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from enum import Enum


class Fault(Enum):
    NONE = "none"
    # Connections are refused at once (closed on accept): the dependency is gone.
    GONE = "gone"
    # Connections are accepted and nothing ever answers: the dependency hangs.
    HUNG = "hung"


class FaultProxy:
    """Forwards 127.0.0.1:<port> to `target_port` until told otherwise; a new fault also cuts every
    open connection, so clients' kept-alive connections meet it too."""

    def __init__(self) -> None:
        self.fault = Fault.NONE
        self.target_port = 0
        # The HTTP requests that went through, in order, as "METHOD /path" (the IVS operation).
        self.requests: list[str] = []
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def stop(self) -> None:
        await self._cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def set(self, fault: Fault) -> None:
        self.fault = fault
        await self._cut()

    async def _cut(self) -> None:
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            if self.fault is Fault.GONE:
                return
            if self.fault is Fault.HUNG:
                await asyncio.Event().wait()
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            try:
                await asyncio.gather(
                    _pipe(reader, upstream_writer, self._saw), _pipe(upstream_reader, writer)
                )
            finally:
                upstream_writer.close()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    def _saw(self, data: bytes) -> None:
        self.requests.extend(f"{m.decode()} {p.decode()}" for m, p in _REQUEST_LINE.findall(data))


_REQUEST_LINE = re.compile(rb"(GET|POST|PUT|DELETE|PATCH) (/\S*) HTTP/1\.[01]\r\n")


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, saw: Callable[[bytes], None] | None = None
) -> None:
    while data := await reader.read(65536):
        if saw is not None:
            saw(data)
        writer.write(data)
        await writer.drain()
    with contextlib.suppress(OSError):
        writer.write_eof()


@contextlib.asynccontextmanager
async def fault_proxy() -> AsyncIterator[FaultProxy]:
    proxy = FaultProxy()
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()
