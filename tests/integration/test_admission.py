"""Admission by the host app through the real HTTP API: tickets signed with a secret or a JWKS."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.system import System, running_system
from tests.integration.test_viewers import start_show
from tests.integration.waiting import eventually

SECRET = "host-app-ticket-secret-0123456789abcdef-0123456789"


def ticket_claims(
    room: str = "main", sub: str = "alice", role: str = "viewer", **extra: Any
) -> dict[str, Any]:
    return {"room": room, "sub": sub, "role": role, "exp": int(time.time()) + 60, **extra}


def hs256(**claims: Any) -> str:
    return jwt.encode(ticket_claims(**claims), SECRET, algorithm="HS256")


class Answers:
    """Every answer the test received, so it can check that no ticket was ever echoed."""

    def __init__(self, http: aiohttp.ClientSession, system: System) -> None:
        self._http = http
        self._url = system.gateway_url
        self.texts: list[str] = []

    async def call(
        self, method: str, path: str, ticket: str | None = None, body: dict[str, Any] | None = None
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {ticket}"} if ticket is not None else {}
        async with self._http.request(method, self._url + path, json=body, headers=headers) as response:
            if response.content_type == "text/event-stream":
                return response.status, None  # the stream opened; its events are test_viewers' business
            text = await response.text()
            self.texts.append(text + json.dumps(dict(response.headers)))
            return response.status, json.loads(text) if text else None

    async def viewer(self, ticket: str | None, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        return await self.call("POST", "/api/token/viewer", ticket, body or {})


async def scraped(
    http: aiohttp.ClientSession, system: System, family: str, labels: tuple[str, ...]
) -> dict[tuple[str, ...], float]:
    """The family's nonzero samples, by label values, from the gateway's /metrics as Prometheus reads it."""
    async with http.get(f"{system.gateway_url}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {
        tuple(sample.labels[label] for label in labels): sample.value
        for metric in text_string_to_metric_families(text)
        if metric.name == family
        for sample in metric.samples
        if sample.name == f"{family}_total" and sample.value
    }


async def ticket_outcomes(http: aiohttp.ClientSession, system: System) -> dict[tuple[str, ...], float]:
    return await scraped(http, system, "fanout_gateway_tickets", ("role", "outcome"))


async def jwks_refreshes(http: aiohttp.ClientSession, system: System) -> dict[tuple[str, ...], float]:
    return await scraped(http, system, "fanout_gateway_jwks_refreshes", ("outcome",))


def assert_refused(answer: tuple[int, Any], status: int, code: str) -> None:
    got_status, body = answer
    assert (got_status, body["error"]["code"]) == (status, code), answer
    assert set(body) == {"error"} and isinstance(body["error"]["message"], str)


def assert_never_echoed(tickets: list[str], answers: Answers, caplog: pytest.LogCaptureFixture) -> None:
    logged = [
        f"{record.getMessage()} {record.args!r} {record.exc_text or ''} {record.__dict__!r}"
        for record in caplog.records
    ]
    for ticket in tickets:
        signature = ticket.rsplit(".", 1)[-1]
        for text in logged + answers.texts:
            assert ticket not in text
            assert len(signature) < 8 or signature not in text


async def test_viewer_tickets_admit_to_their_room_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with (
        running_system(tmp_path, FANOUT_VIEWER_AUTH="jwt", FANOUT_TICKET_SECRET=SECRET) as system,
        aiohttp.ClientSession() as http,
    ):
        await start_show(http, system, room="main")
        await start_show(http, system, room="other")
        api = Answers(http, system)
        good = hs256(room="main", sub="alice")

        status, body = await api.viewer(good)
        assert status == 200, body
        assert (body["room"], body["userId"], body["tier"]) == ("main", "alice", "realtime")
        status, again = await api.viewer(good, {"room": "main", "userId": "alice"})
        assert status == 200 and again["stageArn"] == body["stageArn"]  # sticky: the same viewer

        assert_refused(await api.viewer(good, {"room": "other"}), 403, "ticket_room_mismatch")
        assert_refused(await api.viewer(good, {"userId": "mallory"}), 403, "ticket_subject_mismatch")
        assert_refused(await api.viewer(hs256(role="publisher")), 403, "ticket_role_mismatch")
        assert_refused(await api.viewer(None), 401, "ticket_required")

        expired = jwt.encode(ticket_claims(exp=int(time.time()) - 3600), SECRET, algorithm="HS256")
        wrong_signature = jwt.encode(ticket_claims(), "another-secret-" + SECRET, algorithm="HS256")
        alg_none = jwt.encode(ticket_claims(), None, algorithm="none")
        tampered = good.rsplit(".", 1)[0] + "." + wrong_signature.rsplit(".", 1)[1]
        refused = [expired, wrong_signature, alg_none, tampered, "not-a-ticket", "e30.e30.e30", good[:-10]]
        for ticket in refused:
            assert_refused(await api.viewer(ticket), 401, "invalid_ticket")

        # heartbeat and leave stay open: they only act on the lease the ticket admitted.
        status, _ = await api.call("POST", "/api/viewer/heartbeat", None, {"room": "main", "userId": "alice"})
        assert status == 200
        status, _ = await api.call("POST", "/api/viewer/leave", None, {"room": "main", "userId": "alice"})
        assert status == 204

        # One outcome per ticket presented, the reason only in the metric; no subject, room or ticket.
        assert await ticket_outcomes(http, system) == {
            ("viewer", "accepted"): 2,
            ("viewer", "wrong_room"): 1,
            ("viewer", "wrong_subject"): 1,
            ("viewer", "wrong_role"): 1,
            ("viewer", "missing"): 1,
            ("viewer", "expired"): 1,
            ("viewer", "invalid"): len(refused) - 1,
        }
        assert await jwks_refreshes(http, system) == {}  # a shared secret: nothing to fetch
        async with http.get(f"{system.gateway_url}/metrics") as response:
            exposition = await response.text()
        assert "alice" not in exposition and "mallory" not in exposition
    assert_never_echoed([good, *refused], api, caplog)


async def test_publisher_tickets_open_their_room_only_beside_the_static_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # Open viewers: a configured key source is enough for publisher tickets.
    async with (
        running_system(tmp_path, FANOUT_TICKET_SECRET=SECRET) as system,
        aiohttp.ClientSession() as http,
    ):
        api = Answers(http, system)
        launch = hs256(room="launch", sub="host-7", role="publisher")
        viewer_ticket = hs256(room="launch", role="viewer")

        status, body = await api.call("POST", "/api/token/publisher-all", launch, {"room": "launch"})
        assert status == 200 and body["room"] == "launch" and body["tokens"], body
        claims = jwt.decode(body["tokens"][0]["token"], options={"verify_signature": False})
        assert claims["user_id"] == "host-7"  # the ticket's subject is the publisher's userId
        status, body = await api.call("POST", "/api/token/publisher-all", launch, {})
        assert status == 200 and body["room"] == "launch"

        other = ("POST", "/api/token/publisher-all", launch, {"room": "other"})
        assert_refused(await api.call(*other), 403, "ticket_room_mismatch")
        assert_refused(await api.call("DELETE", "/api/rooms/other", launch), 403, "ticket_room_mismatch")
        assert_refused(
            await api.call("GET", "/api/rooms/other/publisher/events", launch), 403, "ticket_room_mismatch"
        )
        assert_refused(
            await api.call(
                "POST", "/api/rooms/other/publisher/status", launch, {"stageArn": "x", "publishing": True}
            ),
            403,
            "ticket_room_mismatch",
        )
        for path, method, body in (
            ("/api/token/publisher-all", "POST", {"room": "launch"}),
            ("/api/rooms/launch", "DELETE", None),
        ):
            assert_refused(await api.call(method, path, viewer_ticket, body), 403, "ticket_role_mismatch")
        forged = jwt.encode(ticket_claims(room="launch", role="publisher"), "x" * 64, algorithm="HS256")
        assert_refused(await api.call("DELETE", "/api/rooms/launch", forged), 401, "invalid_ticket")

        status, _ = await api.call("GET", "/api/rooms/launch/publisher/events", launch)
        assert status == 200
        status, _ = await api.call(
            "POST", "/api/token/publisher-all", system.publisher_key, {"room": "other"}
        )
        assert status == 200  # the static key still opens every room
        status, _ = await api.call("DELETE", "/api/rooms/launch", launch)
        assert status == 204

        # The static key is no ticket; open viewers export no viewer outcomes at all.
        assert await ticket_outcomes(http, system) == {
            ("publisher", "accepted"): 4,
            ("publisher", "wrong_room"): 4,
            ("publisher", "wrong_role"): 2,
            ("publisher", "invalid"): 1,
        }
        async with http.get(f"{system.gateway_url}/metrics") as response:
            exposition = await response.text()
        assert 'role="viewer"' not in exposition and "host-7" not in exposition
    assert_never_echoed([launch, viewer_ticket, forged], api, caplog)


class JwksHost:
    """The host app's JWKS endpoint on 127.0.0.1: keys can be published while it runs; counts fetches."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.fetches += 1
        return web.json_response({"keys": self.keys})

    def publish(self, public_key: Any, kid: str) -> None:
        if isinstance(public_key, rsa.RSAPublicKey):
            data = jwt.algorithms.RSAAlgorithm.to_jwk(public_key, as_dict=True)
        else:
            data = jwt.algorithms.ECAlgorithm.to_jwk(public_key, as_dict=True)
        self.keys.append({**data, "kid": kid, "use": "sig"})


@asynccontextmanager
async def jwks_host() -> AsyncIterator[JwksHost]:
    host = JwksHost()
    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", host.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    host.url = f"http://127.0.0.1:{port}/.well-known/jwks.json"
    try:
        yield host
    finally:
        await runner.cleanup()


async def test_jwks_tickets_and_rotation_without_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    first = ec.generate_private_key(ec.SECP256R1())
    rotated = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    async with jwks_host() as host:
        host.publish(first.public_key(), "key-1")
        async with (
            running_system(
                tmp_path,
                FANOUT_VIEWER_AUTH="jwt",
                FANOUT_TICKET_JWKS_URL=host.url,
                FANOUT_TICKET_JWKS_MIN_REFETCH_SECONDS="1",
            ) as system,
            aiohttp.ClientSession() as http,
        ):
            await start_show(http, system, room="main")
            api = Answers(http, system)
            good = jwt.encode(ticket_claims(), first, algorithm="ES256", headers={"kid": "key-1"})
            status, body = await api.viewer(good)
            assert status == 200 and body["userId"] == "alice", body
            assert host.fetches == 1

            refused = [
                jwt.encode(
                    ticket_claims(), rotated, algorithm="RS256", headers={"kid": "key-1"}
                ),  # wrong key
                jwt.encode(ticket_claims(), None, algorithm="none", headers={"kid": "key-1"}),
                jwt.encode(ticket_claims(), SECRET, algorithm="HS256", headers={"kid": "key-1"}),
                jwt.encode(ticket_claims(), first, algorithm="ES256"),  # no kid
                jwt.encode(ticket_claims(room="other"), first, algorithm="ES256", headers={"kid": "key-1"})[
                    :-4
                ],
            ]
            for ticket in refused:
                assert_refused(await api.viewer(ticket), 401, "invalid_ticket")

            # A flood of unknown kids costs the host app at most one fetch per refetch interval.
            started, before = time.monotonic(), host.fetches
            unknown = [
                jwt.encode(ticket_claims(), rotated, algorithm="RS256", headers={"kid": f"unknown-{n}"})
                for n in range(30)
            ]
            for ticket in unknown:
                assert_refused(await api.viewer(ticket), 401, "invalid_ticket")
            assert host.fetches - before <= int(time.monotonic() - started) + 1

            # Rotation: the host app publishes a new key; tickets signed with it pass, no restart.
            host.publish(rotated.public_key(), "key-2")
            fresh = jwt.encode(ticket_claims(sub="bob"), rotated, algorithm="RS256", headers={"kid": "key-2"})
            tries = 0

            async def admitted() -> bool:
                nonlocal tries
                tries += 1
                status, _ = await api.viewer(fresh)
                return status == 200

            await eventually(admitted, what="the rotated key to be fetched", within=10, every=0.2)
            status, _ = await api.viewer(good)
            assert status == 200  # the first key still works while both are published

            # Every fetch the host app served is one ok refresh; unknown kids are told from bad tickets.
            assert await jwks_refreshes(http, system) == {("ok",): host.fetches}
            assert await ticket_outcomes(http, system) == {
                ("viewer", "accepted"): 3,
                ("viewer", "invalid"): len(refused),
                ("viewer", "unknown_key"): len(unknown) + tries - 1,
            }
    assert_never_echoed([good, fresh, *refused, *unknown[:3]], api, caplog)


async def test_an_unreachable_jwks_is_a_503_not_a_401(tmp_path: Path) -> None:
    async with jwks_host() as host:
        url = host.url
    key = ec.generate_private_key(ec.SECP256R1())
    async with (
        running_system(tmp_path, FANOUT_VIEWER_AUTH="jwt", FANOUT_TICKET_JWKS_URL=url) as system,
        aiohttp.ClientSession() as http,
    ):
        api = Answers(http, system)
        ticket = jwt.encode(ticket_claims(), key, algorithm="ES256", headers={"kid": "key-1"})
        status, body = await api.viewer(ticket)
        assert_refused((status, body), 503, "ticket_keys_unavailable")
        # Within FANOUT_TICKET_JWKS_MIN_REFETCH_SECONDS the gateway does not try again.
        assert_refused(await api.viewer(ticket), 503, "ticket_keys_unavailable")
        assert await jwks_refreshes(http, system) == {("failed",): 1}
        assert await ticket_outcomes(http, system) == {("viewer", "keys_unavailable"): 2}
