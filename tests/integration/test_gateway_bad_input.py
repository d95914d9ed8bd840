"""Malformed requests against every gateway endpoint: the exact 4xx, the JSON error shape, nothing changed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.config import GatewaySettings
from protos.fanout.v1 import allocator_pb2, stagemanager_pb2

JSON = "application/json"
ROOM = "main"
RESIDENT = "resident-viewer"
UNKNOWN_ARN = "arn:aws:ivs:us-east-1:123456789012:stage/zzzzZZZZzzzz"
# Above any sane FANOUT_MAX_BODY_BYTES (default 16 KiB), small enough for one socket write.
OVERSIZED = 64 * 1024

# Authorization header choices: the configured key, none, or literal wrong values.
KEY = "<key>"
WRONG_AUTH = ["Bearer not-the-publisher-key-000000", "Basic cHVibGlzaGVyOmtleQ==", "Bearer ", "Bearer"]


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    path: str
    status: int
    code: str
    body: bytes | None = None
    content_type: str | None = JSON
    auth: str | None = None

    def __str__(self) -> str:
        return self.id


def body(value: Any) -> bytes:
    return json.dumps(value).encode()


def malformed_body_cases(
    name: str, path: str, auth: str | None, *, text_plain_ok: bool = False
) -> list[Case]:
    """What is wrong with the body itself, before any field is read."""
    cases = [
        Case(
            f"{name}-form-encoded",
            "POST",
            path,
            415,
            "unsupported_media_type",
            b"room=main",
            "application/x-www-form-urlencoded",
            auth,
        ),
        Case(
            f"{name}-no-content-type",
            "POST",
            path,
            415,
            "unsupported_media_type",
            body({"room": ROOM}),
            None,
            auth,
        ),
        Case(
            f"{name}-xml",
            "POST",
            path,
            415,
            "unsupported_media_type",
            b"<room>main</room>",
            "application/xml",
            auth,
        ),
        Case(f"{name}-broken-json", "POST", path, 400, "invalid_json", b'{"room": ', JSON, auth),
        Case(
            f"{name}-trailing-garbage", "POST", path, 400, "invalid_json", b'{"room": "main"} x', JSON, auth
        ),
        Case(f"{name}-not-utf8", "POST", path, 400, "invalid_json", b'{"room": "\xff\xfe"}', JSON, auth),
        Case(
            f"{name}-deep-nesting", "POST", path, 400, "invalid_json", b"[" * 5000 + b"]" * 5000, JSON, auth
        ),
        Case(
            f"{name}-huge-number",
            "POST",
            path,
            400,
            "invalid_json",
            b'{"n": ' + b"9" * 5000 + b"}",
            JSON,
            auth,
        ),
        Case(f"{name}-array", "POST", path, 400, "invalid_argument", b"[]", JSON, auth),
        Case(f"{name}-string", "POST", path, 400, "invalid_argument", b'"main"', JSON, auth),
        Case(f"{name}-null", "POST", path, 400, "invalid_argument", b"null", JSON, auth),
        Case(f"{name}-number", "POST", path, 400, "invalid_argument", b"42", JSON, auth),
        Case(
            f"{name}-too-large",
            "POST",
            path,
            413,
            "payload_too_large",
            body({"room": ROOM, "pad": "x" * OVERSIZED}),
            JSON,
            auth,
        ),
    ]
    if not text_plain_ok:
        cases.append(
            Case(
                f"{name}-text-plain",
                "POST",
                path,
                415,
                "unsupported_media_type",
                body({"room": ROOM}),
                "text/plain",
                auth,
            )
        )
    return cases


BAD_ROOMS: list[tuple[str, Any]] = [
    ("number", 123),
    ("list", [ROOM]),
    ("object", {"id": ROOM}),
    ("bool", True),
    ("empty", ""),
    ("upper-case", "Main"),
    ("leading-dash", "-main"),
    ("underscore", "main_room"),
    ("space", "main room"),
    ("slash", "main/x"),
    ("unicode", "mäin"),
    ("newline", "main\n"),
    ("too-long", "a" * 65),
]
BAD_USER_IDS: list[tuple[str, Any]] = [
    ("number", 42),
    ("list", ["u"]),
    ("bool", False),
    ("empty", ""),
    ("too-long", "u" * 129),
    ("nul", "a\u0000b"),
    ("newline", "a\nb"),
    ("del", "a\u007fb"),
    ("c1-control", "a\u0085b"),
]


def field_cases(name: str, path: str, auth: str | None, base: dict[str, Any]) -> list[Case]:
    cases = [
        Case(
            f"{name}-room-{label}",
            "POST",
            path,
            400,
            "invalid_argument",
            body({**base, "room": value}),
            JSON,
            auth,
        )
        for label, value in BAD_ROOMS
    ]
    cases += [
        Case(
            f"{name}-user-{label}",
            "POST",
            path,
            400,
            "invalid_argument",
            body({**base, "userId": value}),
            JSON,
            auth,
        )
        for label, value in BAD_USER_IDS
    ]
    # JSON may carry a lone surrogate; UTF-8 (and so protobuf) cannot.
    prefix = json.dumps(base)[:-1] + (", " if base else "")
    cases.append(
        Case(
            f"{name}-user-lone-surrogate",
            "POST",
            path,
            400,
            "invalid_argument",
            (prefix + '"userId": "a\\ud800b"}').encode(),
            JSON,
            auth,
        )
    )
    return cases


def missing_field_cases(name: str, path: str, content_type: str = JSON) -> list[Case]:
    return [
        Case(f"{name}-empty-object", "POST", path, 400, "invalid_argument", b"{}", content_type),
        Case(f"{name}-empty-body", "POST", path, 400, "invalid_argument", b"", None),
        Case(
            f"{name}-no-room", "POST", path, 400, "invalid_argument", body({"userId": RESIDENT}), content_type
        ),
        Case(
            f"{name}-null-room",
            "POST",
            path,
            400,
            "invalid_argument",
            body({"room": None, "userId": RESIDENT}),
            content_type,
        ),
        Case(f"{name}-no-user", "POST", path, 400, "invalid_argument", body({"room": ROOM}), content_type),
        Case(
            f"{name}-null-user",
            "POST",
            path,
            400,
            "invalid_argument",
            body({"room": ROOM, "userId": None}),
            content_type,
        ),
    ]


STATUS_PATH = f"/api/rooms/{ROOM}/publisher/status"
GOOD_STATUS = {"stageArn": UNKNOWN_ARN, "publishing": True}
BAD_STATUS_FIELDS: list[tuple[str, dict[str, Any]]] = [
    ("empty-object", {}),
    ("no-arn", {"publishing": True}),
    ("no-publishing", {"stageArn": UNKNOWN_ARN}),
    ("publishing-string", {**GOOD_STATUS, "publishing": "true"}),
    ("publishing-number", {**GOOD_STATUS, "publishing": 1}),
    ("publishing-null", {**GOOD_STATUS, "publishing": None}),
    ("arn-null", {**GOOD_STATUS, "stageArn": None}),
    ("arn-number", {**GOOD_STATUS, "stageArn": 7}),
    ("arn-empty", {**GOOD_STATUS, "stageArn": ""}),
    ("arn-garbage", {**GOOD_STATUS, "stageArn": "not-an-arn"}),
    ("arn-channel", {**GOOD_STATUS, "stageArn": "arn:aws:ivs:us-east-1:123456789012:channel/abcdABCDefgh"}),
    ("arn-other-service", {**GOOD_STATUS, "stageArn": "arn:aws:s3:us-east-1:123456789012:stage/abcd"}),
    ("arn-no-id", {**GOOD_STATUS, "stageArn": "arn:aws:ivs:us-east-1:123456789012:stage/"}),
    ("arn-too-long", {**GOOD_STATUS, "stageArn": "arn:aws:ivs:us-east-1:123456789012:stage/" + "a" * 100}),
]

CASES: list[Case] = [
    # POST /api/token/publisher-all (publisher)
    *malformed_body_cases("publisher-all", "/api/token/publisher-all", KEY),
    *field_cases("publisher-all", "/api/token/publisher-all", KEY, {}),
    # POST /api/token/viewer
    *malformed_body_cases("viewer", "/api/token/viewer", None),
    *field_cases("viewer", "/api/token/viewer", None, {"room": ROOM}),
    # POST /api/viewer/heartbeat
    *malformed_body_cases("heartbeat", "/api/viewer/heartbeat", None),
    *field_cases("heartbeat", "/api/viewer/heartbeat", None, {"room": ROOM, "userId": RESIDENT}),
    *missing_field_cases("heartbeat", "/api/viewer/heartbeat"),
    # POST /api/viewer/leave (text/plain is allowed for sendBeacon)
    *malformed_body_cases("leave", "/api/viewer/leave", None, text_plain_ok=True),
    *field_cases("leave", "/api/viewer/leave", None, {"room": ROOM, "userId": RESIDENT}),
    *missing_field_cases("leave", "/api/viewer/leave"),
    *missing_field_cases("leave-text-plain", "/api/viewer/leave", content_type="text/plain"),
    # POST /api/rooms/{room}/publisher/status (publisher)
    *malformed_body_cases("status", STATUS_PATH, KEY),
    *[
        Case(f"status-{label}", "POST", STATUS_PATH, 400, "invalid_argument", body(value), JSON, KEY)
        for label, value in BAD_STATUS_FIELDS
    ],
    Case(
        "status-path-room-upper",
        "POST",
        "/api/rooms/Main/publisher/status",
        400,
        "invalid_argument",
        body(GOOD_STATUS),
        JSON,
        KEY,
    ),
    Case(
        "status-path-room-too-long",
        "POST",
        f"/api/rooms/{'a' * 65}/publisher/status",
        400,
        "invalid_argument",
        body(GOOD_STATUS),
        JSON,
        KEY,
    ),
    # GET /api/rooms/{room}
    Case("get-room-upper", "GET", "/api/rooms/Main", 400, "invalid_argument", None, None),
    Case("get-room-leading-dash", "GET", "/api/rooms/-main", 400, "invalid_argument", None, None),
    Case("get-room-encoded-space", "GET", "/api/rooms/main%20x", 400, "invalid_argument", None, None),
    Case("get-room-encoded-nul", "GET", "/api/rooms/main%00", 400, "invalid_argument", None, None),
    Case("get-room-too-long", "GET", f"/api/rooms/{'a' * 65}", 400, "invalid_argument", None, None),
    # DELETE /api/rooms/{room} (publisher)
    Case("delete-room-upper", "DELETE", "/api/rooms/Main", 400, "invalid_argument", None, None, KEY),
    Case("delete-room-underscore", "DELETE", "/api/rooms/main_x", 400, "invalid_argument", None, None, KEY),
    # Publisher auth: missing or wrong keys are refused before anything is read or done.
    *[
        Case(
            f"{name}-auth-{index}",
            method,
            path,
            401,
            "unauthorized",
            payload,
            JSON if payload else None,
            auth,
        )
        for name, method, path, payload in [
            ("publisher-all", "POST", "/api/token/publisher-all", body({"room": "other-room"})),
            ("status", "POST", STATUS_PATH, body({"stageArn": UNKNOWN_ARN, "publishing": True})),
            ("delete-room", "DELETE", f"/api/rooms/{ROOM}", None),
            ("publisher-all-bad-body", "POST", "/api/token/publisher-all", b"{broken"),
        ]
        for index, auth in enumerate([None, *WRONG_AUTH])
    ],
    # Routing: unknown paths and wrong methods answer JSON too.
    Case("unknown-api-path", "GET", "/api/nope", 404, "not_found", None, None),
    Case("unknown-token-kind", "POST", "/api/token/admin", 404, "not_found", body({}), JSON),
    Case("unknown-page", "GET", "/nope", 404, "not_found", None, None),
    Case("static-traversal", "GET", "/static/../pyproject.toml", 404, "not_found", None, None),
    Case("viewer-get", "GET", "/api/token/viewer", 405, "method_not_allowed", None, None),
    Case(
        "publisher-all-put", "PUT", "/api/token/publisher-all", 405, "method_not_allowed", body({}), JSON, KEY
    ),
    Case("heartbeat-get", "GET", "/api/viewer/heartbeat", 405, "method_not_allowed", None, None),
    Case("leave-delete", "DELETE", "/api/viewer/leave", 405, "method_not_allowed", None, None),
    Case("room-put", "PUT", f"/api/rooms/{ROOM}", 405, "method_not_allowed", body({}), JSON),
    Case("status-get", "GET", STATUS_PATH, 405, "method_not_allowed", None, None, KEY),
    Case("config-post", "POST", "/api/config", 405, "method_not_allowed", body({}), JSON),
    Case("healthz-post", "POST", "/healthz", 405, "method_not_allowed", body({}), JSON),
]


async def send(
    session: aiohttp.ClientSession, system: Any, case: Case
) -> tuple[int, aiohttp.typedefs.LooseHeaders, bytes]:
    headers: dict[str, str] = {}
    if case.content_type is not None:
        headers["Content-Type"] = case.content_type
    if case.auth == KEY:
        headers["Authorization"] = f"Bearer {system.publisher_key}"
    elif case.auth is not None:
        headers["Authorization"] = case.auth
    async with session.request(
        case.method,
        system.gateway_url + case.path,
        data=case.body,
        headers=headers,
        skip_auto_headers={"Content-Type"},
    ) as response:
        return response.status, response.headers, await response.read()


async def snapshot(system: Any) -> dict[str, Any]:
    """What a wrongly accepted request could have changed: rooms, publishing flags and leases."""
    stagemanager, allocator = system.stagemanager, system.allocator
    rooms = await stagemanager.ListRooms(stagemanager_pb2.ListRoomsRequest(), timeout=5)
    occupancy = await allocator.GetOccupancy(allocator_pb2.GetOccupancyRequest(), timeout=5)
    return {
        "rooms": {room.room: room.publishing for room in rooms.rooms},
        "leased": sorted((entry.room, entry.stage_arn, entry.leased) for entry in occupancy.stages),
    }


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def populated(system: Any, session: aiohttp.ClientSession) -> dict[str, Any]:
    """The room exists (through the public API) and one viewer holds a lease in it."""
    auth = {"Authorization": f"Bearer {system.publisher_key}"}
    async with session.post(
        f"{system.gateway_url}/api/token/publisher-all", json={"room": ROOM}, headers=auth
    ) as response:
        assert response.status == 200, await response.text()
        publisher = await response.json()
    viewer = await _assign_viewer(session, system, RESIDENT)
    # The snapshot must see what a wrongly accepted request would change, or it proves nothing.
    state = await snapshot(system)
    assert state["rooms"] == {ROOM: False}
    assert state["leased"] == [(ROOM, viewer["stageArn"], 1)]
    return {"publisher": publisher, "viewer": viewer}


async def _assign_viewer(session: aiohttp.ClientSession, system: Any, user_id: str) -> dict[str, Any]:
    # The allocator learns of a new room over WatchRoom; give it a moment rather than assume it is instant.
    for _ in range(50):
        async with session.post(
            f"{system.gateway_url}/api/token/viewer", json={"room": ROOM, "userId": user_id}
        ) as response:
            if response.status == 200:
                result: dict[str, Any] = await response.json()
                return result
            last = (response.status, await response.text())
        await asyncio.sleep(0.1)
    raise AssertionError(f"viewer was never placed: {last}")


def assert_error_shape(
    status: int, headers: Any, raw: bytes, expected_status: int, expected_code: str
) -> None:
    assert status == expected_status, raw
    assert headers["Content-Type"].startswith("application/json")
    payload = json.loads(raw)
    assert set(payload) == {"error"}, payload
    assert set(payload["error"]) == {"code", "message"}, payload
    assert payload["error"]["code"] == expected_code, payload
    assert isinstance(payload["error"]["message"], str) and payload["error"]["message"].strip()
    assert b"Traceback" not in raw


@pytest.mark.parametrize("case", CASES, ids=str)
async def test_malformed_request_is_refused_and_changes_nothing(
    system: Any, populated: dict[str, Any], session: aiohttp.ClientSession, case: Case
) -> None:
    before = await snapshot(system)

    status, headers, raw = await send(session, system, case)

    assert_error_shape(status, headers, raw, case.status, case.code)
    assert system.publisher_key.encode() not in raw
    assert populated["viewer"]["token"].encode() not in raw
    if case.status == 401:
        assert headers["WWW-Authenticate"].startswith("Bearer")
    if case.status == 405:
        assert headers["Allow"]
    assert await snapshot(system) == before


@dataclass(frozen=True)
class UpstreamCase:
    id: str
    method: str
    path: str
    payload: dict[str, Any] | None
    status: int
    code: str
    publisher: bool = False

    def __str__(self) -> str:
        return self.id


# Well-formed requests the services refuse: their status and error code come through unchanged.
UPSTREAM_CASES = [
    UpstreamCase(
        "heartbeat-unknown-viewer",
        "POST",
        "/api/viewer/heartbeat",
        {"room": ROOM, "userId": "ghost"},
        404,
        "lease_not_found",
    ),
    UpstreamCase(
        "heartbeat-unknown-room",
        "POST",
        "/api/viewer/heartbeat",
        {"room": "no-such-room", "userId": RESIDENT},
        404,
        "lease_not_found",
    ),
    UpstreamCase("get-unknown-room", "GET", "/api/rooms/no-such-room", None, 404, "room_not_found"),
    UpstreamCase(
        "viewer-unknown-room", "POST", "/api/token/viewer", {"room": "no-such-room"}, 404, "room_not_found"
    ),
    UpstreamCase(
        "status-unknown-stage",
        "POST",
        STATUS_PATH,
        {"stageArn": UNKNOWN_ARN, "publishing": True},
        404,
        "stage_not_found",
        publisher=True,
    ),
]


@pytest.mark.parametrize("case", UPSTREAM_CASES, ids=str)
async def test_refusal_from_a_service_keeps_its_status_and_code(
    system: Any, populated: dict[str, Any], session: aiohttp.ClientSession, case: UpstreamCase
) -> None:
    before = await snapshot(system)
    headers = {"Authorization": f"Bearer {system.publisher_key}"} if case.publisher else {}

    async with session.request(
        case.method, system.gateway_url + case.path, json=case.payload, headers=headers
    ) as response:
        status, response_headers, raw = response.status, response.headers, await response.read()

    assert_error_shape(status, response_headers, raw, case.status, case.code)
    assert await snapshot(system) == before


async def test_oversized_chunked_body_is_refused(
    system: Any, populated: dict[str, Any], session: aiohttp.ClientSession
) -> None:
    # No Content-Length: the limit has to hold while reading, not only on the declared size.
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"room": "main", "pad": "'
        for _ in range(16):
            yield b"x" * 4096
        yield b'"}'

    before = await snapshot(system)
    async with session.post(
        f"{system.gateway_url}/api/token/viewer", data=chunks(), headers={"Content-Type": JSON}
    ) as response:
        status, headers, raw = response.status, response.headers, await response.read()

    assert_error_shape(status, headers, raw, 413, "payload_too_large")
    assert await snapshot(system) == before


async def test_leave_accepts_a_beacon_and_is_idempotent(
    system: Any, populated: dict[str, Any], session: aiohttp.ClientSession
) -> None:
    # navigator.sendBeacon(url, string) sends text/plain;charset=UTF-8.
    beacon = {"Content-Type": "text/plain;charset=UTF-8"}
    leave = {"room": ROOM, "userId": RESIDENT}
    url = system.gateway_url

    for _ in range(2):
        async with session.post(
            f"{url}/api/viewer/leave", data=json.dumps(leave), headers=beacon
        ) as response:
            assert response.status == 204

    async with session.post(f"{url}/api/viewer/heartbeat", json=leave) as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "lease_not_found"


async def test_rejected_requests_are_counted_by_route_pattern(
    system: Any, session: aiohttp.ClientSession
) -> None:
    async with session.get(f"{system.gateway_url}/api/rooms/Not-A-Room") as response:
        assert response.status == 400
    async with session.get(f"{system.gateway_url}/metrics") as response:
        assert response.status == 200
        text = await response.text()

    assert 'route="/api/rooms/{room}"' in text
    assert 'status="400"' in text
    assert "Not-A-Room" not in text


async def test_flooding_one_address_is_rate_limited() -> None:
    settings = GatewaySettings(rate_limit_per_second=1, rate_limit_burst=3, publisher_keys=("k" * 32,))
    async with TestClient(TestServer(create_app(settings))) as client:
        statuses = []
        for _ in range(5):
            async with client.get("/api/config") as response:
                statuses.append(response.status)
                last_headers, last_raw = response.headers, await response.read()
        # Probes are never limited: an orchestrator must always get an answer.
        async with client.get("/healthz") as response:
            healthz_status = response.status

    assert statuses[:3] == [200, 200, 200]
    assert statuses[3:] == [429, 429]
    assert_error_shape(429, last_headers, last_raw, 429, "rate_limited")
    assert int(last_headers["Retry-After"]) >= 1
    assert healthz_status == 200
