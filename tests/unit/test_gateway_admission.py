"""The ticket verifier: PyJWT with a fixed algorithm per key, required claims, one refusal for every fault."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from prometheus_client import CollectorRegistry

from gateway.admission import (
    Admission,
    InvalidTicket,
    JwksFileKeys,
    SecretKey,
    Ticket,
    TicketMismatch,
    TicketRequired,
    TicketVerifier,
)
from gateway.auth import PublisherAuth
from gateway.errors import ApiError
from gateway.metrics import GatewayMetrics

SECRET = "s" * 64
STATIC_KEY = "static-publisher-key-0123456789"


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"room": "main", "sub": "alice", "role": "viewer", "exp": int(time.time()) + 60}
    base.update(overrides)
    return {key: value for key, value in base.items() if value is not None}


def unused_metrics() -> GatewayMetrics:
    return GatewayMetrics(CollectorRegistry())


def secret_verifier(**options: Any) -> TicketVerifier:
    defaults: dict[str, Any] = {"leeway_seconds": 5, "issuer": None, "audience": None}
    return TicketVerifier(SecretKey(SECRET), **{**defaults, **options})


def jwk(public_key: Any, kid: str) -> dict[str, Any]:
    return {**json.loads(_to_jwk(public_key)), "kid": kid, "use": "sig"}


def _to_jwk(public_key: Any) -> str:
    algorithm = (
        jwt.algorithms.RSAAlgorithm
        if isinstance(public_key, rsa.RSAPublicKey)
        else jwt.algorithms.ECAlgorithm
    )
    return str(algorithm.to_jwk(public_key))


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "p256": ec.generate_private_key(ec.SECP256R1()),
        "p384": ec.generate_private_key(ec.SECP384R1()),
    }


@pytest.fixture
def jwks_verifier(keys: dict[str, Any], tmp_path: Path) -> TicketVerifier:
    path = tmp_path / "jwks.json"
    path.write_text(
        json.dumps(
            {
                "keys": [
                    jwk(keys["rsa"].public_key(), "rsa-1"),
                    jwk(keys["p256"].public_key(), "ec-1"),
                    jwk(keys["p384"].public_key(), "ec-384"),
                ]
            }
        )
    )
    return TicketVerifier(JwksFileKeys(path), leeway_seconds=5, issuer=None, audience=None)


async def test_a_valid_hs256_ticket_gives_room_subject_and_role() -> None:
    ticket = jwt.encode(claims(role="publisher"), SECRET, algorithm="HS256")
    assert await secret_verifier().verify(ticket) == Ticket(room="main", subject="alice", role="publisher")


@pytest.mark.parametrize(
    "ticket",
    [
        jwt.encode(claims(exp=int(time.time()) - 60), SECRET, algorithm="HS256"),
        jwt.encode(claims(), "another-secret-of-enough-length-0123456789", algorithm="HS256"),
        jwt.encode(claims(), SECRET, algorithm="HS384"),
        jwt.encode(claims(), None, algorithm="none"),
        jwt.encode(claims(exp=None), SECRET, algorithm="HS256"),
        jwt.encode(claims(room=None), SECRET, algorithm="HS256"),
        jwt.encode(claims(sub=None), SECRET, algorithm="HS256"),
        jwt.encode(claims(role="admin"), SECRET, algorithm="HS256"),
        jwt.encode(claims(role=["viewer"]), SECRET, algorithm="HS256"),
        jwt.encode(claims(room="Not A Room"), SECRET, algorithm="HS256"),
        jwt.encode(claims(room=["main"]), SECRET, algorithm="HS256"),
        jwt.encode(claims(sub=""), SECRET, algorithm="HS256"),
        "not-a-jwt",
        "a.b.c",
        "",
    ],
    ids=[
        "expired",
        "wrong-secret",
        "hs384",
        "alg-none",
        "no-exp",
        "no-room",
        "no-sub",
        "bad-role",
        "role-not-a-string",
        "bad-room",
        "room-not-a-string",
        "empty-sub",
        "garbage",
        "three-garbage-parts",
        "empty",
    ],
)
async def test_every_faulty_hs256_ticket_is_the_same_401(ticket: str) -> None:
    with pytest.raises(InvalidTicket) as raised:
        await secret_verifier().verify(ticket)
    assert (raised.value.status, raised.value.code) == (401, "invalid_ticket")
    assert ticket not in raised.value.message or not ticket


async def test_the_leeway_admits_a_ticket_just_expired_and_no_more() -> None:
    just = jwt.encode(claims(exp=int(time.time()) - 2), SECRET, algorithm="HS256")
    assert (await secret_verifier(leeway_seconds=30).verify(just)).subject == "alice"
    with pytest.raises(InvalidTicket):
        await secret_verifier(leeway_seconds=0).verify(just)


async def test_issuer_and_audience_are_checked_when_configured() -> None:
    verifier = secret_verifier(issuer="https://host.example", audience="fanout")
    good = jwt.encode(claims(iss="https://host.example", aud="fanout"), SECRET, algorithm="HS256")
    assert (await verifier.verify(good)).room == "main"
    for bad in (
        claims(iss="https://evil.example", aud="fanout"),
        claims(iss="https://host.example", aud="other"),
        claims(aud="fanout"),
        claims(iss="https://host.example"),
    ):
        with pytest.raises(InvalidTicket):
            await verifier.verify(jwt.encode(bad, SECRET, algorithm="HS256"))


async def test_jwks_keys_verify_with_the_algorithm_of_their_type(
    keys: dict[str, Any], jwks_verifier: TicketVerifier
) -> None:
    rs = jwt.encode(claims(), keys["rsa"], algorithm="RS256", headers={"kid": "rsa-1"})
    es = jwt.encode(claims(), keys["p256"], algorithm="ES256", headers={"kid": "ec-1"})
    assert (await jwks_verifier.verify(rs)).subject == "alice"
    assert (await jwks_verifier.verify(es)).subject == "alice"


async def test_jwks_tickets_with_a_foreign_algorithm_or_key_are_refused(
    keys: dict[str, Any], jwks_verifier: TicketVerifier
) -> None:
    rsa_public_pem = (
        keys["rsa"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    # The classic confusion: HS256 "signed" with the public key, under the RSA key's kid.
    confused = _hs256_with_raw_key(rsa_public_pem, "rsa-1")
    faulty = [
        confused,
        jwt.encode(claims(), keys["rsa"], algorithm="RS512", headers={"kid": "rsa-1"}),
        jwt.encode(claims(), keys["rsa"], algorithm="PS256", headers={"kid": "rsa-1"}),
        jwt.encode(claims(), keys["p256"], algorithm="ES256", headers={"kid": "rsa-1"}),
        jwt.encode(claims(), keys["p384"], algorithm="ES384", headers={"kid": "ec-384"}),
        jwt.encode(claims(), keys["rsa"], algorithm="RS256", headers={"kid": "unknown"}),
        jwt.encode(claims(), keys["rsa"], algorithm="RS256"),
        jwt.encode(claims(), None, algorithm="none", headers={"kid": "rsa-1"}),
        jwt.encode(claims(), SECRET, algorithm="HS256"),
    ]
    for ticket in faulty:
        with pytest.raises(InvalidTicket):
            await jwks_verifier.verify(ticket)


def _hs256_with_raw_key(key: bytes, kid: str) -> str:
    # PyJWT itself refuses to HMAC with a PEM key, so the test builds the forgery by hand.
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = (
        b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
        + "."
        + b64(json.dumps(claims()).encode())
    )
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


def test_ticket_checks_room_role_and_subject() -> None:
    ticket = Ticket(room="main", subject="alice", role="viewer")
    assert ticket.admit_body({}, "viewer") == {"room": "main", "userId": "alice"}
    assert ticket.admit_body({"room": "main", "userId": "alice"}, "viewer")["userId"] == "alice"
    for body, role, code in (
        ({"room": "other"}, "viewer", "ticket_room_mismatch"),
        ({"userId": "mallory"}, "viewer", "ticket_subject_mismatch"),
        ({}, "publisher", "ticket_role_mismatch"),
    ):
        with pytest.raises(TicketMismatch) as raised:
            ticket.admit_body(body, role)
        assert (raised.value.status, raised.value.code) == (403, code)


async def test_admission_takes_static_keys_or_publisher_tickets() -> None:
    admission = Admission(
        PublisherAuth([STATIC_KEY]), secret_verifier(), viewer_tickets=True, metrics=unused_metrics()
    )
    ticket = jwt.encode(claims(role="publisher"), SECRET, algorithm="HS256")
    assert await admission.publisher(f"Bearer {STATIC_KEY}") is None
    assert (await admission.publisher(f"Bearer {ticket}")) == Ticket("main", "alice", "publisher")
    assert (await admission.viewer(f"Bearer {ticket}")).role == "publisher"  # the handler checks the role
    for header, error in (
        (None, TicketRequired),
        ("Basic abc", TicketRequired),
        ("Bearer x.y.z", InvalidTicket),
    ):
        with pytest.raises(error):
            await admission.viewer(header)
    with pytest.raises(ApiError) as raised:
        await admission.publisher("Bearer not-a-key")
    assert raised.value.code == "unauthorized"


async def test_without_a_verifier_tickets_are_not_publisher_credentials() -> None:
    admission = Admission(PublisherAuth([STATIC_KEY]), None, viewer_tickets=False, metrics=unused_metrics())
    ticket = jwt.encode(claims(role="publisher"), SECRET, algorithm="HS256")
    assert await admission.viewer(None) is None
    with pytest.raises(ApiError) as raised:
        await admission.publisher(f"Bearer {ticket}")
    assert raised.value.code == "unauthorized"


async def test_the_refusal_reason_tells_expired_and_unknown_keys_apart_for_the_metrics_only(
    keys: dict[str, Any], jwks_verifier: TicketVerifier
) -> None:
    expired = jwt.encode(claims(exp=int(time.time()) - 60), SECRET, algorithm="HS256")
    forged_and_expired = jwt.encode(claims(exp=int(time.time()) - 60), "x" * 64, algorithm="HS256")
    unknown = jwt.encode(claims(), keys["rsa"], algorithm="RS256", headers={"kid": "unknown"})
    for verifier, ticket, reason in (
        (secret_verifier(), expired, "expired"),
        (secret_verifier(), forged_and_expired, "invalid"),  # the signature is checked first
        (jwks_verifier, unknown, "unknown_key"),
        (jwks_verifier, jwt.encode(claims(), keys["rsa"], algorithm="RS256"), "invalid"),  # no kid
    ):
        with pytest.raises(InvalidTicket) as raised:
            await verifier.verify(ticket)
        assert raised.value.reason == reason
        assert (raised.value.code, raised.value.message) == (
            "invalid_ticket",
            "The admission ticket is not valid.",
        )


async def test_admission_counts_each_ticket_once_with_the_deciding_outcome() -> None:
    registry = CollectorRegistry()
    admission = Admission(
        PublisherAuth([STATIC_KEY]), secret_verifier(), viewer_tickets=True, metrics=GatewayMetrics(registry)
    )

    def count(role: str, outcome: str) -> float | None:
        return registry.get_sample_value("fanout_gateway_tickets_total", {"role": role, "outcome": outcome})

    assert count("viewer", "accepted") == 0 and count("publisher", "keys_unavailable") == 0  # pre-created
    viewer = await admission.viewer(f"Bearer {jwt.encode(claims(), SECRET, algorithm='HS256')}")
    assert admission.admit_body(viewer, {}, "viewer") == {"room": "main", "userId": "alice"}
    with pytest.raises(TicketMismatch):
        admission.admit_body(viewer, {"room": "other"}, "viewer")
    with pytest.raises(TicketMismatch):
        admission.require(viewer, room="main", role="publisher")
    publisher = await admission.publisher(
        f"Bearer {jwt.encode(claims(role='publisher'), SECRET, algorithm='HS256')}"
    )
    with pytest.raises(TicketMismatch):
        admission.require(publisher, room="main", role="publisher", user_id="mallory")
    admission.require(None, room="other", role="publisher")  # a static key: not a ticket, not counted
    assert await admission.publisher(f"Bearer {STATIC_KEY}") is None
    with pytest.raises(TicketRequired):
        await admission.viewer(None)
    with pytest.raises(InvalidTicket):
        await admission.viewer(f"Bearer {jwt.encode(claims(exp=1), SECRET, algorithm='HS256')}")
    with pytest.raises(InvalidTicket):
        await admission.publisher("Bearer x.y.z")

    counted = {
        (sample.labels["role"], sample.labels["outcome"]): sample.value
        for metric in registry.collect()
        if metric.name == "fanout_gateway_tickets"
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.value
    }
    assert counted == {
        ("viewer", "accepted"): 1,
        ("viewer", "wrong_room"): 1,
        ("publisher", "wrong_role"): 1,
        ("publisher", "wrong_subject"): 1,
        ("viewer", "missing"): 1,
        ("viewer", "expired"): 1,
        ("publisher", "invalid"): 1,
    }


def test_without_viewer_tickets_only_publisher_outcomes_are_exported() -> None:
    registry = CollectorRegistry()
    Admission(PublisherAuth([]), secret_verifier(), viewer_tickets=False, metrics=GatewayMetrics(registry))
    labels = {"outcome": "accepted"}
    assert registry.get_sample_value("fanout_gateway_tickets_total", {"role": "publisher", **labels}) == 0
    assert registry.get_sample_value("fanout_gateway_tickets_total", {"role": "viewer", **labels}) is None
