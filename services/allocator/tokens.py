"""Minting IVS participant tokens: self-signed ES384 JWTs, or CreateParticipantToken as the fallback."""

from __future__ import annotations

import math
import secrets
import string
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric import ec

from services.common import jwt_es384
from services.common.ids import MAX_USER_ID_LENGTH, stage_id

MAX_ATTRIBUTES_BYTES = 1024  # ivs-facts §1.1: attributes are at most 1 KB in total
MAX_TTL_SECONDS = 20160 * 60  # the API's longest token (14 days); self-signed tokens keep to it too
PARTICIPANT_ID_CHARS = 16
_PARTICIPANT_ID_ALPHABET = string.ascii_letters + string.digits


class InvalidTokenRequest(ValueError):
    """The arguments cannot make a valid participant token. Messages never contain token text."""


class TokenServiceError(RuntimeError):
    """CreateParticipantToken answered with something that is not a usable token."""


@dataclass(frozen=True)
class StageEndpoints:
    """What a token names: the Stage and the endpoints from CreateStage/GetStage."""

    arn: str
    events_url: str
    whip_url: str


@dataclass(frozen=True)
class IssuedToken:
    """A minted token. The token is a secret, so it is left out of repr (and str) and never logged."""

    stage_arn: str
    token: str = field(repr=False)
    participant_id: str
    expires_at: datetime


class TokenMinter(Protocol):
    async def mint(
        self,
        stage: StageEndpoints,
        user_id: str,
        publish: bool,
        subscribe: bool,
        attributes: Mapping[str, str],
        ttl_seconds: int,
    ) -> IssuedToken: ...


def validate_request(
    user_id: str, publish: bool, subscribe: bool, attributes: Mapping[str, str], ttl_seconds: int
) -> None:
    """Raises InvalidTokenRequest unless IVS would accept a token with these contents."""
    if not 1 <= len(user_id) <= MAX_USER_ID_LENGTH:
        raise InvalidTokenRequest(f"user id must be 1-{MAX_USER_ID_LENGTH} characters, got {len(user_id)}")
    if not (publish or subscribe):
        raise InvalidTokenRequest("a token must allow publishing, subscribing or both")
    size = 0
    for key, value in attributes.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidTokenRequest("token attributes must map strings to strings")
        size += len(key.encode("utf-8")) + len(value.encode("utf-8"))
    if size > MAX_ATTRIBUTES_BYTES:
        raise InvalidTokenRequest(f"token attributes are {size} bytes, more than {MAX_ATTRIBUTES_BYTES}")
    if not 1 <= ttl_seconds <= MAX_TTL_SECONDS:
        raise InvalidTokenRequest(f"token lifetime must be 1-{MAX_TTL_SECONDS} seconds, got {ttl_seconds}")


def topic(stage_arn: str) -> str:
    """The `topic` claim: the Stage id, refused unless the ARN has one."""
    if "/" not in stage_arn or not stage_id(stage_arn):
        raise InvalidTokenRequest(f"not a stage ARN: {stage_arn!r}")
    return stage_id(stage_arn)


def new_participant_id() -> str:
    """A fresh random participant id (the `jti`), alphanumeric like the AWS samples' ids."""
    # One read of the system's randomness instead of one per character (a system call each).
    # Bytes at or above 248 (= 4 x 62) are dropped so every character stays equally likely.
    chars: list[str] = []
    while len(chars) < PARTICIPANT_ID_CHARS:
        chars.extend(
            _PARTICIPANT_ID_ALPHABET[byte % 62]
            for byte in secrets.token_bytes(2 * PARTICIPANT_ID_CHARS)
            if byte < 248
        )
    return "".join(chars[:PARTICIPANT_ID_CHARS])


class SelfSignedMinter:
    """Signs tokens with the private half of a key pair imported into IVS; `kid` is the public key ARN."""

    def __init__(
        self, private_key: ec.EllipticCurvePrivateKey, kid: str, clock: Callable[[], float] = time.time
    ) -> None:
        if not isinstance(private_key.curve, ec.SECP384R1):
            raise ValueError("the signing key must be an EC P-384 (secp384r1) private key")
        self._key = private_key
        self._kid = kid
        self._clock = clock

    async def mint(
        self,
        stage: StageEndpoints,
        user_id: str,
        publish: bool,
        subscribe: bool,
        attributes: Mapping[str, str],
        ttl_seconds: int,
    ) -> IssuedToken:
        validate_request(user_id, publish, subscribe, attributes, ttl_seconds)
        issued_at = int(self._clock())
        expires = issued_at + ttl_seconds
        participant_id = new_participant_id()
        # The claim set of ivs-facts §1.1, exactly.
        claims: dict[str, Any] = {
            "exp": expires,
            "iat": issued_at,
            "jti": participant_id,
            "resource": stage.arn,
            "topic": topic(stage.arn),
            "events_url": stage.events_url,
            "whip_url": stage.whip_url,
            "user_id": user_id,
            "attributes": dict(attributes),
            "capabilities": {"allow_publish": publish, "allow_subscribe": subscribe},
            "version": "1.0",
        }
        # Signed inline on the event loop: one ES384 signature is ~0.17 ms. cryptography releases the
        # GIL while signing, but on a 2-core host already saturated by the gateway and allocator a
        # signing pool measured slower (hand-off ~30-50 us per token); worth measuring on 4+ cores.
        token = jwt_es384.sign(claims, self._key, self._kid)
        return IssuedToken(
            stage_arn=stage.arn,
            token=token,
            participant_id=participant_id,
            expires_at=datetime.fromtimestamp(expires, UTC),
        )


class ApiMinter:
    """Asks IVS for each token (CreateParticipantToken): the fallback when no signing key is configured.

    `create_participant_token` performs the call with keyword arguments stageArn, userId, attributes,
    capabilities and duration (minutes), and returns the whole response, whose `participantToken`
    holds token, participantId and expirationTime (a datetime, as boto3 gives it).
    """

    def __init__(self, create_participant_token: Callable[..., Awaitable[Mapping[str, Any]]]) -> None:
        self._create = create_participant_token

    async def mint(
        self,
        stage: StageEndpoints,
        user_id: str,
        publish: bool,
        subscribe: bool,
        attributes: Mapping[str, str],
        ttl_seconds: int,
    ) -> IssuedToken:
        validate_request(user_id, publish, subscribe, attributes, ttl_seconds)
        capabilities = (["PUBLISH"] if publish else []) + (["SUBSCRIBE"] if subscribe else [])
        # The API counts in whole minutes: round up so a token never lives shorter than asked.
        minutes = min(max(math.ceil(ttl_seconds / 60), 1), 20160)
        response = await self._create(
            stageArn=stage.arn,
            userId=user_id,
            attributes=dict(attributes),
            capabilities=capabilities,
            duration=minutes,
        )
        issued = response.get("participantToken")
        if not isinstance(issued, Mapping):
            raise TokenServiceError("CreateParticipantToken response has no participantToken")
        token = issued.get("token")
        participant_id = issued.get("participantId")
        expires_at = issued.get("expirationTime")
        if not isinstance(token, str) or not token:
            raise TokenServiceError("CreateParticipantToken response has no token")
        if not isinstance(participant_id, str) or not participant_id:
            raise TokenServiceError("CreateParticipantToken response has no participantId")
        if not isinstance(expires_at, datetime):
            raise TokenServiceError("CreateParticipantToken response has no expirationTime")
        if expires_at.tzinfo is None:
            # The API speaks UTC; a naive datetime can only mean UTC.
            expires_at = expires_at.replace(tzinfo=UTC)
        return IssuedToken(
            stage_arn=stage.arn, token=token, participant_id=participant_id, expires_at=expires_at
        )
