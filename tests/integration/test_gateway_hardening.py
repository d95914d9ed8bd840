"""Hostile clients at the socket: secrets stay out of logs and answers, every refusal is the API's JSON,
slow and idle connections end, the connection cap holds, and event streams outlive all of it."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import time
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from services.common.logs import JsonFormatter
from tests.integration.system import System, running_system
from tests.integration.test_gateway_bad_input import (
    JSON,
    RESIDENT,
    ROOM,
    assert_error_shape,
    populated,  # noqa: F401 - a fixture, used by name
    session,  # noqa: F401 - a fixture, used by name
    snapshot,
)
from tests.integration.waiting import eventually

# Every wait on the gateway is bounded by this; generous for a busy 2-core machine, and far below
# the aiohttp default keep-alive (3630 s) that let such connections live for an hour before.
WITHIN = 20.0
Response = tuple[int, CIMultiDict[str], bytes]


# --- raw HTTP over a socket ---------------------------------------------------------------------


def gateway_port(system: System) -> int:
    port = URL(system.gateway_url).port
    assert port is not None
    return port


@contextlib.asynccontextmanager
async def connection(system: System) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway_port(system))
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def parse_head(head: bytes) -> tuple[int, CIMultiDict[str]]:
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in header_lines:
        if line:
            name, _, value = line.partition(":")
            headers.add(name.strip(), value.strip())
    return int(status_line.split(" ")[1]), headers


async def read_response(reader: asyncio.StreamReader) -> Response:
    """One response with a Content-Length body, leaving the connection open for the next one."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WITHIN)
    status, headers = parse_head(head[:-4])
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("Content-Length", "0"))), WITHIN)
    return status, headers, body


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the gateway sends until it closes the connection; fails if it never does.

    A close may reach a client that is still sending as a reset: that ends the stream too, and what
    arrived before it counts (reader.read() would drop it)."""
    received = bytearray()

    async def collect() -> None:
        while chunk := await reader.read(65536):
            received.extend(chunk)

    with contextlib.suppress(ConnectionResetError):
        await asyncio.wait_for(collect(), WITHIN)
    return bytes(received)


def parse_response(raw: bytes) -> Response:
    head, separator, body = raw.partition(b"\r\n\r\n")
    assert separator, raw
    status, headers = parse_head(head)
    return status, headers, body


async def exchange(system: System, request: bytes) -> Response:
    """Sends raw bytes on a new connection; the one answer, read until the gateway closes."""
    async with connection(system) as (reader, writer):
        writer.write(request)
        await writer.drain()
        return parse_response(await read_until_closed(reader))


def request_bytes(
    method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"", close: bool = True
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: gateway"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def assert_key_never_logged(records: list[logging.LogRecord], key: str) -> None:
    """Not in a message, a traceback, a stack or an extra field, in either of our log formats."""
    plain, json_lines = logging.Formatter(), JsonFormatter()
    for record in records:
        for text in (record.getMessage(), plain.format(record), json_lines.format(record)):
            assert key not in text, f"{record.name} logged the publisher key: {text[:300]!r}"


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Every record of every logger, debug included (aiohttp logs some rejections at debug)."""
    caplog.set_level(logging.DEBUG)
    return caplog


# --- 1. the publisher key never reaches a log or an answer ---------------------------------------


def malformed_requests(key: str) -> list[tuple[str, bytes, str]]:
    """(what, raw request, expected error code): each carries the key where a parser will quote it."""
    auth = f"Bearer {key}"
    bad_gzip = {"Authorization": auth, "Content-Type": JSON, "Content-Encoding": "gzip"}
    return [
        (
            "control byte in Authorization",
            request_bytes("GET", "/api/rooms/main", {"Authorization": auth + "\x01"}),
            "malformed_request",
        ),
        (
            "NUL in Authorization",
            request_bytes("GET", "/api/rooms/main", {"Authorization": auth + "\x00x"}),
            "malformed_request",
        ),
        (
            "Authorization padded past the header size limit",
            request_bytes("GET", "/api/rooms/main", {"Authorization": auth + "x" * 9000}),
            "headers_too_large",
        ),
        (
            "key in a header name with a control byte",
            request_bytes("GET", "/healthz", {f"X-{key}\x01": "1"}),
            "malformed_request",
        ),
        (
            "too many headers, each with the key",
            request_bytes("GET", "/healthz", {f"X-Key-{index}": auth for index in range(200)}),
            "malformed_request",
        ),
        (
            "key in a garbage request line",
            f"GET /{key} HTTP/1.1 trailing\r\nHost: gateway\r\n\r\n".encode(),
            "malformed_request",
        ),
        (
            "key as the method",
            f"{key}\x01 / HTTP/1.1\r\nHost: gateway\r\n\r\n".encode(),
            "malformed_request",
        ),
        (
            "TLS on the plain-text port",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + key.encode(),
            "malformed_request",
        ),
        (
            "gzip body that does not decode",
            request_bytes("POST", "/api/token/publisher-all", bad_gzip, b"not gzip " + key.encode()),
            "malformed_body",
        ),
        (
            "unsupported Content-Encoding",
            request_bytes("POST", "/api/token/publisher-all", {**bad_gzip, "Content-Encoding": "br"}, b"{}"),
            "malformed_body",
        ),
        (
            "broken chunked framing",
            request_bytes(
                "POST",
                "/api/token/publisher-all",
                {"Authorization": auth, "Content-Type": JSON, "Transfer-Encoding": "chunked"},
            ).replace(b"Content-Length: 0\r\n", b"")
            + b"zz\r\n"
            + key.encode()
            + b"\r\n0\r\n\r\n",
            "malformed_request",
        ),
    ]


async def test_malformed_requests_never_put_the_publisher_key_in_logs_or_answers(
    system: System, logs: pytest.LogCaptureFixture
) -> None:
    key = system.publisher_key
    cases = malformed_requests(key)

    answers = {what: await exchange(system, raw) for what, raw, _ in cases}

    for what, _, code in cases:
        status, headers, body = answers[what]
        assert key.encode() not in body, what
        assert status == 400, (what, body)
        assert_error_shape(status, headers, body, 400, code)
    # The refusals were logged (so this run can see a leak), each as one line without a traceback.
    refusals = [record for record in logs.records if record.name == "gateway.http_server"]
    assert refusals
    assert not [record for record in refusals if record.exc_info]
    # aiohttp's server logger is where the key leaked (the emulator's access log may speak meanwhile).
    assert not [record for record in logs.records if record.name == "aiohttp.server"]
    assert_key_never_logged(logs.records, key)


# --- 2. a body that does not decode --------------------------------------------------------------


def leave_body() -> bytes:
    return json.dumps({"room": ROOM, "userId": RESIDENT}).encode()


BAD_ENCODINGS = [
    pytest.param(
        "gzip", lambda: b"\x1f\x8b\x08\x00garbage" + leave_body(), "malformed_body", id="gzip-garbage"
    ),
    pytest.param("gzip", leave_body, "malformed_body", id="gzip-plain-json"),
    pytest.param("deflate", lambda: b"\xff\xfe" + leave_body(), "malformed_body", id="deflate-garbage"),
    pytest.param(
        "deflate", lambda: zlib.compress(leave_body())[:-6], "malformed_body", id="deflate-truncated"
    ),
    # aiohttp checks that a deflate stream ends, not a gzip one: a gzip body cut short reads as the
    # JSON prefix it holds, which the JSON parser refuses.
    pytest.param("gzip", lambda: gzip.compress(leave_body())[:-12], "invalid_json", id="gzip-truncated"),
]


@pytest.mark.parametrize(("encoding", "payload", "code"), BAD_ENCODINGS)
async def test_a_body_that_does_not_decode_is_a_400_and_changes_nothing(
    system: System,
    populated: dict[str, Any],  # noqa: F811 - the imported fixture
    session: aiohttp.ClientSession,  # noqa: F811 - the imported fixture
    encoding: str,
    payload: Callable[[], bytes],
    code: str,
) -> None:
    before = await snapshot(system)

    # A leave: were any of these bodies read as JSON, the resident viewer's lease would be gone.
    async with session.post(
        f"{system.gateway_url}/api/viewer/leave",
        data=payload(),
        headers={"Content-Type": JSON, "Content-Encoding": encoding},
    ) as response:
        status, headers, raw = response.status, response.headers, await response.read()

    assert_error_shape(status, headers, raw, 400, code)
    assert await snapshot(system) == before


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_that_decodes_is_still_read(
    system: System,
    populated: dict[str, Any],  # noqa: F811 - the imported fixture
    session: aiohttp.ClientSession,  # noqa: F811 - the imported fixture
    encoding: str,
) -> None:
    compress = gzip.compress if encoding == "gzip" else zlib.compress
    async with session.post(
        f"{system.gateway_url}/api/viewer/leave",
        data=compress(leave_body()),
        headers={"Content-Type": JSON, "Content-Encoding": encoding},
    ) as response:
        assert response.status == 204, await response.text()

    assert [entry for entry in (await snapshot(system))["leased"] if entry[2]] == []


# --- 3. static files ------------------------------------------------------------------------------


@pytest.fixture
async def web_system(tmp_path: Path) -> AsyncIterator[System]:
    """A web folder of our own: a file, a folder, and symlinks that lead out of it or nowhere."""
    web = tmp_path / "web"
    (web / "js").mkdir(parents=True)
    (web / "js" / "app.js").write_text("export const ok = true;\n")
    (web / "watch.html").write_text("<!doctype html><title>watch</title>\n")
    (tmp_path / "outside.txt").write_text("OUTSIDE THE WEB FOLDER\n")
    (web / "js" / "escape.txt").symlink_to(tmp_path / "outside.txt")
    (web / "loop").symlink_to(web / "loop")
    async with running_system(tmp_path, FANOUT_WEB_DIR=str(web)) as running:
        yield running


MISSING_STATIC = [
    "/static/missing.js",
    "/static/js/missing.js",
    "/static/js",
    "/static/js/",
    "/static/",
    "/static/../outside.txt",
    "/static/js/../../outside.txt",
    "/static/%2e%2e/outside.txt",
    "/static/js/%2e%2e%2f%2e%2e%2foutside.txt",
    "/static/..%2foutside.txt",
    "/static/%2fetc%2fpasswd",
    "/static//etc/passwd",
    "/static/js/escape.txt",
    "/static/loop",
    "/static/a%00b",
    "/static/%ff%fe",
]


async def test_missing_static_files_answer_404_in_the_error_shape(web_system: System) -> None:
    for path in MISSING_STATIC:
        for method in ("GET", "HEAD"):
            status, headers, body = await exchange(web_system, request_bytes(method, path))

            assert status == 404, (method, path, body)
            assert headers["Content-Type"].startswith("application/json"), (method, path)
            assert b"OUTSIDE" not in body and b"root:" not in body, (method, path)
            if method == "GET":
                assert_error_shape(status, headers, body, 404, "not_found")


async def test_static_files_and_pages_are_still_served(web_system: System) -> None:
    status, headers, body = await exchange(web_system, request_bytes("GET", "/static/js/app.js"))
    assert status == 200
    assert body == b"export const ok = true;\n"

    status, headers, body = await exchange(web_system, request_bytes("GET", "/watch"))
    assert status == 200
    assert headers["Cache-Control"] == "no-cache"


# --- 4. slow, idle and too many connections --------------------------------------------------------

# Small timeouts so the slow-client tests end in seconds. The idle timeout is clearly longer than
# the header timeout, so a 408 can only come from the header clock, and a silent close after a
# response only from the idle one.
FAST_TIMEOUTS = {
    "FANOUT_HTTP_HEADER_TIMEOUT_SECONDS": "1",
    "FANOUT_HTTP_BODY_TIMEOUT_SECONDS": "1",
    "FANOUT_HTTP_IDLE_SECONDS": "4",
    "FANOUT_SSE_KEEPALIVE_SECONDS": "1",
}


async def drip(writer: asyncio.StreamWriter, data: bytes, every: float = 0.2) -> None:
    """Sends `data` a byte at a time, as a slow-loris client does, until done or disconnected."""
    with contextlib.suppress(ConnectionError):
        for index in range(len(data)):
            writer.write(data[index : index + 1])
            await writer.drain()
            await asyncio.sleep(every)


@pytest.fixture
async def fast_system(tmp_path: Path) -> AsyncIterator[System]:
    async with running_system(tmp_path, **FAST_TIMEOUTS) as running:
        yield running


async def test_slow_clients_with_the_key_never_put_it_in_logs(
    fast_system: System, logs: pytest.LogCaptureFixture
) -> None:
    key = fast_system.publisher_key
    # The key is with the gateway from the start; then the rest trickles in until a timeout ends it.
    headers_so_far = f"GET /api/rooms/main HTTP/1.1\r\nAuthorization: Bearer {key}\r\n".encode()
    body_so_far = (
        request_bytes(
            "POST", "/api/token/publisher-all", {"Authorization": f"Bearer {key}", "Content-Type": JSON}
        ).replace(b"Content-Length: 0", b"Content-Length: 100")
        + f'{{"room": "{key}'.encode()
    )
    slow_clients = [
        (headers_so_far, b"X-Slow: 1\r\n" * 50, "header_timeout"),
        (body_so_far, b" " * 100, "body_timeout"),
    ]

    for sent_at_once, trickle, code in slow_clients:
        async with connection(fast_system) as (reader, writer):
            writer.write(sent_at_once)
            dripping = asyncio.create_task(drip(writer, trickle))
            answer = await read_until_closed(reader)
            dripping.cancel()
        assert key.encode() not in answer
        status, headers, body = parse_response(answer)
        assert_error_shape(status, headers, body, 408, code)

    assert_key_never_logged(logs.records, key)


@pytest.mark.parametrize("kept_alive", [False, True], ids=["fresh", "kept-alive"])
async def test_headers_that_drip_in_get_408_and_the_connection_closes(
    fast_system: System, kept_alive: bool
) -> None:
    async with connection(fast_system) as (reader, writer):
        if kept_alive:
            # The header clock of a later request starts at its first byte, not at the last response.
            writer.write(request_bytes("GET", "/healthz", close=False))
            assert (await read_response(reader))[0] == 200
        dripping = asyncio.create_task(drip(writer, b"GET /healthz HTTP/1.1\r\n" + b"X-Slow: 1\r\n" * 100))

        answer = await read_until_closed(reader)

        dripping.cancel()
    status, headers, body = parse_response(answer)
    assert_error_shape(status, headers, body, 408, "header_timeout")


async def test_a_connection_that_sends_nothing_is_closed(fast_system: System) -> None:
    async with connection(fast_system) as (reader, _):
        assert await read_until_closed(reader) == b""


async def test_an_idle_kept_alive_connection_is_closed(fast_system: System) -> None:
    async with connection(fast_system) as (reader, writer):
        writer.write(request_bytes("GET", "/healthz", close=False))
        status, headers, _ = await read_response(reader)
        assert status == 200 and headers.get("Connection", "").lower() != "close"

        assert await read_until_closed(reader) == b""


async def test_a_body_that_never_completes_gets_408_and_the_connection_closes(fast_system: System) -> None:
    head = request_bytes("POST", "/api/viewer/heartbeat", {"Content-Type": JSON}, close=False)
    head = head.replace(b"Content-Length: 0", b"Content-Length: 200")
    async with connection(fast_system) as (reader, writer):
        writer.write(head + b'{"room": "main", ')
        dripping = asyncio.create_task(drip(writer, b" " * 200))

        answer = await read_until_closed(reader)

        dripping.cancel()
    status, headers, body = parse_response(answer)
    assert_error_shape(status, headers, body, 408, "body_timeout")
    assert headers["Connection"].lower() == "close"


async def test_a_hundred_slow_or_idle_connections_all_end_while_the_gateway_serves(
    fast_system: System,
    session: aiohttp.ClientSession,  # noqa: F811 - the imported fixture
) -> None:
    async def slow_client(index: int) -> bytes:
        async with connection(fast_system) as (reader, writer):
            if index % 2:  # idle: never sends a byte
                return await read_until_closed(reader)
            # slow: drips its headers at a byte a second
            dripping = asyncio.create_task(drip(writer, b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 100, 1.0))
            try:
                return await read_until_closed(reader)
            finally:
                dripping.cancel()

    clients = [asyncio.create_task(slow_client(index)) for index in range(100)]
    while not all(client.done() for client in clients):
        async with session.get(f"{fast_system.gateway_url}/healthz") as response:
            assert response.status == 200
        await asyncio.wait(clients, timeout=0.5)

    answers = [client.result() for client in clients]
    assert all(answer == b"" for answer in answers[1::2])
    assert all(parse_response(answer)[0] == 408 for answer in answers[::2])


async def test_the_event_stream_outlives_every_timeout(
    fast_system: System,
    session: aiohttp.ClientSession,  # noqa: F811 - the imported fixture
) -> None:
    url = f"{fast_system.gateway_url}/api/rooms/{ROOM}/publisher/events"
    async with session.get(
        url, headers=fast_system.publisher_headers(), timeout=aiohttp.ClientTimeout(total=None)
    ) as response:
        assert response.status == 200
        started, comments, events = time.monotonic(), 0, []
        # Keep-alive comments come every second: six of them span all three timeouts (1, 1 and 4 s).
        while comments < 6:
            line = await asyncio.wait_for(response.content.readline(), WITHIN)
            assert line, f"the stream ended after {time.monotonic() - started:.1f}s"
            if line.startswith(b":"):
                comments += 1
            elif line.startswith(b"event: "):
                events.append(line.decode().strip())

        assert "event: snapshot" in events
        assert time.monotonic() - started > 4
        assert await asyncio.wait_for(response.content.readline(), WITHIN)


async def test_connections_beyond_the_cap_get_503_until_one_closes(tmp_path: Path) -> None:
    async with (
        running_system(tmp_path, FANOUT_HTTP_MAX_CONNECTIONS="3") as system,
        contextlib.AsyncExitStack() as held,
    ):
        # Three kept-alive connections, each known to be accepted: it answered a request.
        connections = [await held.enter_async_context(connection(system)) for _ in range(3)]
        for reader, writer in connections:
            writer.write(request_bytes("GET", "/healthz", close=False))
            assert (await read_response(reader))[0] == 200

        status, headers, body = await exchange(system, request_bytes("GET", "/healthz"))

        assert_error_shape(status, headers, body, 503, "too_many_connections")
        assert int(headers["Retry-After"]) >= 1

        _, first = connections[0]
        first.close()

        async def served() -> bool:
            status, _, _ = await exchange(system, request_bytes("GET", "/healthz"))
            return status == 200

        await eventually(served, what="a connection slot to free up", within=WITHIN)
        _, _, metrics = await exchange(system, request_bytes("GET", "/metrics"))

    refused = [
        line
        for line in metrics.decode().splitlines()
        if line.startswith("fanout_http_connections_refused_total")
    ]
    assert float(refused[0].split()[1]) >= 1
