"""The gateway's HTTP server: aiohttp's protocol with header/idle timeouts, a connection cap and safe logs.

Every process that serves the gateway (`python -m gateway`, the integration tests) starts it through
`start_http_server`, so what is tested is what runs.

Timeouts, per connection (the body timeout lives where bodies are read, `api._json_body`):
- header: a request's headers must be complete within `http_header_timeout_seconds` of the connection
  opening or, on a kept-alive connection, of the request's first byte;
- idle: a connection must complete its next request's headers within `http_idle_seconds` of opening
  or of the previous response. This is aiohttp's keep-alive timer, which incoming bytes do not push,
  so it is also an overall deadline for headers. It never cuts a request in progress, so long-lived
  event streams are safe from both.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, cast

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import RawRequestMessage
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong, PayloadEncodingError
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from yarl import URL

from gateway.appkeys import METRICS
from gateway.config import GatewaySettings
from gateway.errors import MalformedBody
from gateway.metrics import GatewayMetrics
from gateway.middlewares import error_response

log = logging.getLogger(__name__)

# After an early answer (413, 408, 401 before the body was read), aiohttp keeps reading the unread
# body so the client sees the answer rather than a reset. Our bodies are a few KiB, which arrive in
# well under this on any real link; a client that trickles gets no longer than this.
_LINGER_SECONDS = 2.0
# How long a refused connection may stay half-closed while its client reads the 503.
_REFUSED_GRACE_SECONDS = 2.0
_CONNECTION_LIMIT_RETRY_AFTER = 5
# Descriptors the process needs besides client connections: gRPC channels, files, the listener.
_SPARE_DESCRIPTORS = 64
# At most one warning per this many seconds while connections are being refused.
_REFUSAL_WARNING_EVERY_SECONDS = 10.0


def _raw_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 error answer in the API's shape, for the moments aiohttp has no request."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "Content-Type: application/json; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


_HEADER_TIMEOUT_RESPONSE = _raw_error(408, "header_timeout", "The request headers did not arrive in time.")
_CONNECTION_LIMIT_RESPONSE = _raw_error(
    503,
    "too_many_connections",
    "The gateway has too many open connections; try again shortly.",
    {"Retry-After": str(_CONNECTION_LIMIT_RETRY_AFTER)},
)


def _rejection(status: int, exc: BaseException | None) -> tuple[str, str]:
    """Code and message for a request aiohttp refused before (or outside) the app's middlewares.

    Never the parser's own message: it quotes the offending bytes, such as an Authorization header.
    """
    if isinstance(exc, LineTooLong):
        return "headers_too_large", "A request line or header is too long."
    if isinstance(exc, PayloadEncodingError):
        body_error = MalformedBody()
        return body_error.code, body_error.message
    if status >= 500:
        return "internal", "Something went wrong on our side; try again later."
    if status == 400:
        return "malformed_request", "The request is not valid HTTP."
    return f"http_{status}", HTTPStatus(status).phrase


class ConnectionLimit:
    """Open connections of one listening socket, against FANOUT_HTTP_MAX_CONNECTIONS.

    At the limit new connections are refused with a 503 rather than the oldest idle ones closed:
    slow or idle connections already end at the header and idle timeouts, a refusal is cheap and
    says when to retry, and closing an idle keep-alive connection races with the client reusing it,
    which fails requests that were never refused.
    """

    def __init__(
        self, maximum: int, metrics: GatewayMetrics, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.maximum = maximum
        self.open = 0
        self._metrics = metrics
        self._clock = clock
        self._refused_since_warning = 0
        self._warned_at: float | None = None

    def acquire(self) -> bool:
        """Takes a slot for a new connection; False when the limit is reached."""
        if self.open >= self.maximum:
            self._refused()
            return False
        self.open += 1
        self._metrics.http_connections.inc()
        return True

    def release(self) -> None:
        self.open -= 1
        self._metrics.http_connections.dec()

    def _refused(self) -> None:
        self._metrics.http_connections_refused.inc()
        self._refused_since_warning += 1
        now = self._clock()
        # A flood of refusals is one line per interval, not one per connection.
        if self._warned_at is None or now - self._warned_at >= _REFUSAL_WARNING_EVERY_SECONDS:
            log.warning(
                "refusing connections: %d open, the limit (FANOUT_HTTP_MAX_CONNECTIONS); "
                "%d refused since the last warning",
                self.maximum,
                self._refused_since_warning,
            )
            self._warned_at = now
            self._refused_since_warning = 0


class GatewayRequestHandler(RequestHandler):
    """aiohttp's HTTP/1.1 protocol with the gateway's connection cap, header timeout and logging.

    aiohttp's own error path logs the parser's exception with its traceback, and the parser's
    message quotes the bytes it refused: a request with a stray control byte in its Authorization
    header put the publisher key in the log (and in a text/plain answer). Here every refusal is one
    log line (exception class, status, peer) and a JSON answer in the API's shape.
    """

    __slots__ = (
        "_admitted",
        "_draining",
        "_header_bytes",
        "_header_timeout",
        "_header_timer",
        "_in_request",
        "_limit",
        "_previous_body",
        "_refused_close",
    )

    def __init__(
        self,
        manager: web.Server,
        *,
        loop: asyncio.AbstractEventLoop,
        limit: ConnectionLimit,
        header_timeout: float,
        idle_timeout: float,
    ) -> None:
        super().__init__(
            manager,
            loop=loop,
            keepalive_timeout=idle_timeout,
            lingering_time=_LINGER_SECONDS,
            logger=log,
            # Off: its line holds the raw request line, query string included. The observe
            # middleware logs each request by route pattern; handle_error logs each refusal.
            access_log=None,  # type: ignore[arg-type]  # aiohttp documents None as "off"
        )
        self._limit = limit
        self._header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = False
        self._in_request = False
        # The last request's body: bytes after its answer may still be that body, which aiohttp
        # reads and discards for up to _LINGER_SECONDS, not the start of the next request.
        self._previous_body: StreamReader | None = None
        self._admitted = False
        self._draining = False
        self._refused_close: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._limit.acquire():
            self._refuse(cast(asyncio.Transport, transport))
            return
        self._admitted = True
        super().connection_made(transport)
        self._arm_header_timer()

    def _refuse(self, transport: asyncio.Transport) -> None:
        transport.write(_CONNECTION_LIMIT_RESPONSE)
        self._answer_and_close(transport)

    def _answer_and_close(self, transport: asyncio.Transport) -> None:
        """After a final answer: half-close and let the client close. Closing with its request still
        unread would send a reset, which can destroy the answer before the client reads it.
        (aiohttp's eof_received answers None, so the client's FIN closes the transport.)"""
        self._draining = True
        transport.write_eof()
        self._refused_close = self._loop.call_later(_REFUSED_GRACE_SECONDS, transport.close)

    def data_received(self, data: bytes) -> None:
        if not self._admitted or self._draining:
            return  # a refused or answered connection: what it still sends is not read
        if data and not self._in_request and (self._previous_body is None or self._previous_body.is_eof()):
            self._header_bytes = True
            if self._header_timer is None:
                # The first byte of a request on a kept-alive connection starts its header clock.
                self._arm_header_timer()
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused_close is not None:
            self._refused_close.cancel()
        if not self._admitted:
            return
        self._admitted = False
        self._limit.release()
        self._cancel_header_timer()
        super().connection_lost(exc)

    def request_started(self) -> None:
        """The headers of a request are complete and its handling begins (see start_http_server)."""
        self._in_request = True
        self._header_bytes = False
        self._previous_body = None
        self._cancel_header_timer()

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._in_request = False
            self._previous_body = request.content

    def _arm_header_timer(self) -> None:
        self._header_timer = self._loop.call_later(self._header_timeout, self._header_deadline)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline(self) -> None:
        # Runs only while no request is in progress: the timer is cancelled when one starts.
        self._header_timer = None
        if self.transport is None:
            return
        if self._header_bytes:
            # Part of a request arrived: say why it ends. A connection that sent nothing (a browser's
            # spare preconnect) is just closed, like the idle timeout does.
            self.transport.write(_HEADER_TIMEOUT_RESPONSE)
            log.info(
                "closed a connection from %s: headers not complete within %gs",
                _peer(self.peername),
                self._header_timeout,
            )
            self._answer_and_close(self.transport)
            return
        self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """One log line without the exception's text, and a JSON answer that quotes nothing sent."""
        level = logging.ERROR if status >= 500 else logging.INFO
        log.log(
            level,
            "refused a request from %s with %d: %s",
            _peer(self.peername),
            status,
            type(exc).__name__ if exc is not None else "no exception",
        )
        if request.writer.output_size > 0:
            # As aiohttp does: part of a response is out, so no error answer can follow.
            raise ConnectionError("a response was already started; cannot answer with an error")
        code, text = _rejection(status, exc)
        response = error_response(status, code, text)
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp's other error logs (a body that failed to decode after the answer, a handler that
        returned no response): one line with the exception's class, never its text or traceback."""
        error = kw.get("exc_info")
        client_fault = isinstance(error, HttpProcessingError | web.RequestPayloadError)
        log.log(
            logging.INFO if client_fault else logging.ERROR,
            "connection from %s: %s (%s)",
            _peer(self.peername),
            args[0] if args else "error",
            type(error).__name__ if isinstance(error, BaseException) else "no exception",
        )


def _peer(peername: Any) -> str:
    if isinstance(peername, tuple) and peername:
        return str(peername[0])
    return "unknown"


class GatewaySite(web.BaseSite):
    """A TCP listener whose connections are GatewayRequestHandlers under one ConnectionLimit."""

    __slots__ = ("_host", "_limit", "_port", "_settings")

    def __init__(self, runner: web.AppRunner, settings: GatewaySettings) -> None:
        super().__init__(runner)
        self._host = settings.host
        self._port = settings.port
        self._settings = settings
        self._limit = ConnectionLimit(settings.http_max_connections, runner.app[METRICS])

    @property
    def name(self) -> str:
        return str(URL.build(scheme="http", host=self._host, port=self._port))

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None  # runner.setup() ran: BaseSite refuses to be made before it
        loop = asyncio.get_running_loop()
        settings = self._settings

        def new_connection() -> GatewayRequestHandler:
            return GatewayRequestHandler(
                server,
                loop=loop,
                limit=self._limit,
                header_timeout=settings.http_header_timeout_seconds,
                idle_timeout=settings.http_idle_seconds,
            )

        # Several workers listen on one port; the kernel spreads new connections over them.
        self._server = await loop.create_server(
            new_connection, self._host, self._port, reuse_port=settings.workers > 1 or None
        )


def _noting_request_starts(server: web.Server) -> None:
    # web.Server's request factory runs once per request, when its headers are complete and its
    # handling begins: the moment a connection's header clock stops.
    make_request = server.request_factory

    def factory(
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        if isinstance(protocol, GatewayRequestHandler):
            protocol.request_started()
        return make_request(message, payload, protocol, writer, task)

    server.request_factory = factory


def _warn_if_descriptors_run_out_first(max_connections: int) -> None:
    # Past the process's file descriptor limit, accept() fails and clients hang in the backlog
    # instead of getting the 503; containers usually allow far more, a login shell often 1024.
    soft_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft_limit != resource.RLIM_INFINITY and max_connections + _SPARE_DESCRIPTORS > soft_limit:
        log.warning(
            "FANOUT_HTTP_MAX_CONNECTIONS=%d is near or above the open file limit (%d); "
            "raise the limit (ulimit -n) or lower the setting",
            max_connections,
            soft_limit,
        )


async def start_http_server(
    app: web.Application, settings: GatewaySettings, *, shutdown_timeout: float = 60.0
) -> web.AppRunner:
    """Serves `app` on settings.host:settings.port; stop it with `await runner.cleanup()`."""
    runner = web.AppRunner(
        app,
        handle_signals=False,
        # A broadcaster that goes away cancels its event stream at once, not at the next keep-alive.
        handler_cancellation=True,
        shutdown_timeout=shutdown_timeout,
    )
    _warn_if_descriptors_run_out_first(settings.http_max_connections)
    await runner.setup()
    try:
        assert runner.server is not None  # setup() made it
        _noting_request_starts(runner.server)
        await GatewaySite(runner, settings).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
