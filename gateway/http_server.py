"""The gateway's HTTP server: aiohttp's protocol with logs and error answers that quote nothing sent.

Every process that serves the gateway (`python -m gateway`, the integration tests) starts it through
`start_http_server`, so what is tested is what runs.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong, PayloadEncodingError
from aiohttp.web_protocol import RequestHandler
from yarl import URL

from gateway.config import GatewaySettings
from gateway.errors import MalformedBody
from gateway.middlewares import error_response

log = logging.getLogger(__name__)


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


class GatewayRequestHandler(RequestHandler):
    """aiohttp's HTTP/1.1 protocol with the gateway's logging.

    aiohttp's own error path logs the parser's exception with its traceback, and the parser's
    message quotes the bytes it refused: a request with a stray control byte in its Authorization
    header put the publisher key in the log (and in a text/plain answer). Here every refusal is one
    log line (exception class, status, peer) and a JSON answer in the API's shape.
    """

    __slots__ = ()

    def __init__(self, manager: web.Server, *, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(
            manager,
            loop=loop,
            logger=log,
            # Off: its line holds the raw request line, query string included. The observe
            # middleware logs each request by route pattern; handle_error logs each refusal.
            access_log=None,  # type: ignore[arg-type]  # aiohttp documents None as "off"
        )

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
    """A TCP listener whose connections are GatewayRequestHandlers."""

    __slots__ = ("_host", "_port")

    def __init__(self, runner: web.AppRunner, settings: GatewaySettings) -> None:
        super().__init__(runner)
        self._host = settings.host
        self._port = settings.port

    @property
    def name(self) -> str:
        return str(URL.build(scheme="http", host=self._host, port=self._port))

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None  # runner.setup() ran: BaseSite refuses to be made before it
        loop = asyncio.get_running_loop()

        def new_connection() -> GatewayRequestHandler:
            return GatewayRequestHandler(server, loop=loop)

        self._server = await loop.create_server(new_connection, self._host, self._port)


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
    await runner.setup()
    try:
        await GatewaySite(runner, settings).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
