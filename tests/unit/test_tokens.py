"""Participant tokens (self-signed and API-minted) and the signing key file."""

from __future__ import annotations

import re
import stat
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest

from services.allocator.signing_key import SigningKeyError, load_or_create_private_key, load_private_key
from services.allocator.tokens import (
    ApiMinter,
    InvalidTokenRequest,
    IssuedToken,
    SelfSignedMinter,
    StageEndpoints,
    TokenServiceError,
)
from services.common import jwt_es384

KID = "arn:aws:ivs:us-east-1:123456789012:public-key/abcdEFGH1234"
STAGE = StageEndpoints(
    arn="arn:aws:ivs:us-east-1:123456789012:stage/AbCdEfGh1234",
    events_url="wss://global.events.live-video.net",
    whip_url="https://0123456789ab.global-bm.whip.live-video.net",
)
NOW = 1_700_000_000.25


@pytest.fixture(scope="module")
def key() -> Any:
    return jwt_es384.generate_private_key()


@pytest.fixture
def minter(key: Any) -> SelfSignedMinter:
    return SelfSignedMinter(key, KID, clock=lambda: NOW)


async def mint_viewer(minter: SelfSignedMinter, user: str = "viewer-1") -> IssuedToken:
    return await minter.mint(STAGE, user, False, True, {"room": "main", "role": "viewer"}, 3600)


async def test_claims_are_exactly_the_ivs_set(minter: SelfSignedMinter, key: Any) -> None:
    issued = await mint_viewer(minter)
    claims = jwt.decode(
        issued.token,
        jwt_es384.public_key_pem(key),
        algorithms=["ES384"],
        options={"verify_aud": False, "verify_exp": False},
    )
    assert claims == {
        "exp": 1_700_003_600,
        "iat": 1_700_000_000,
        "jti": issued.participant_id,
        "resource": STAGE.arn,
        "topic": "AbCdEfGh1234",
        "events_url": STAGE.events_url,
        "whip_url": STAGE.whip_url,
        "user_id": "viewer-1",
        "attributes": {"room": "main", "role": "viewer"},
        "capabilities": {"allow_publish": False, "allow_subscribe": True},
        "version": "1.0",
    }
    assert issued.stage_arn == STAGE.arn
    assert issued.expires_at == datetime(2023, 11, 14, 23, 13, 20, tzinfo=UTC)
    assert re.fullmatch(r"[A-Za-z0-9]{12,64}", issued.participant_id)


async def test_live_token_verifies_with_pyjwt_and_our_verifier(key: Any) -> None:
    minter = SelfSignedMinter(key, KID)  # real clock, so PyJWT's exp check passes
    issued = await mint_viewer(minter)
    claims = jwt.decode(
        issued.token, jwt_es384.public_key_pem(key), algorithms=["ES384"], options={"verify_aud": False}
    )
    assert claims == jwt_es384.verify(issued.token, key.public_key())
    assert jwt.get_unverified_header(issued.token) == {"alg": "ES384", "typ": "JWT", "kid": KID}


async def test_token_does_not_verify_with_another_key(minter: SelfSignedMinter) -> None:
    issued = await mint_viewer(minter)
    other = jwt_es384.generate_private_key()
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(
            issued.token, jwt_es384.public_key_pem(other), algorithms=["ES384"], options={"verify_exp": False}
        )


async def test_viewer_tokens_never_publish_and_publisher_tokens_do(minter: SelfSignedMinter) -> None:
    viewer = await mint_viewer(minter)
    publisher = await minter.mint(STAGE, "broadcaster", True, True, {"room": "main"}, 3600)
    _, viewer_claims = jwt_es384.decode_unverified(viewer.token)
    _, publisher_claims = jwt_es384.decode_unverified(publisher.token)
    assert viewer_claims["capabilities"] == {"allow_publish": False, "allow_subscribe": True}
    assert publisher_claims["capabilities"] == {"allow_publish": True, "allow_subscribe": True}


async def test_every_token_has_a_fresh_participant_id(minter: SelfSignedMinter) -> None:
    tokens = [await mint_viewer(minter) for _ in range(50)]
    ids = [t.participant_id for t in tokens]
    assert len(set(ids)) == len(ids)
    assert [jwt_es384.decode_unverified(t.token)[1]["jti"] for t in tokens] == ids


async def test_repr_and_str_hide_the_token(minter: SelfSignedMinter) -> None:
    issued = await mint_viewer(minter)
    assert issued.token not in repr(issued)
    assert issued.token not in str(issued)
    assert issued.participant_id in repr(issued)


@pytest.mark.parametrize(
    ("user", "publish", "subscribe", "attributes", "ttl"),
    [
        ("", False, True, {}, 60),
        ("u" * 129, False, True, {}, 60),
        ("u", False, False, {}, 60),
        ("u", False, True, {"k": "v" * 1024}, 60),
        ("u", False, True, {}, 0),
        ("u", False, True, {}, 20160 * 60 + 1),
    ],
)
async def test_invalid_requests_are_refused_by_both_minters(
    minter: SelfSignedMinter, user: str, publish: bool, subscribe: bool, attributes: dict[str, str], ttl: int
) -> None:
    async def never_called(**_: Any) -> Mapping[str, Any]:
        raise AssertionError("IVS must not be called for an invalid request")

    for m in (minter, ApiMinter(never_called)):
        with pytest.raises(ValueError):
            await m.mint(STAGE, user, publish, subscribe, attributes, ttl)


async def test_limits_are_inclusive(minter: SelfSignedMinter) -> None:
    issued = await minter.mint(STAGE, "u" * 128, False, True, {"k": "v" * 1023}, 20160 * 60)
    assert issued.expires_at == datetime.fromtimestamp(int(NOW) + 20160 * 60, UTC)


async def test_bad_stage_arn_is_refused(minter: SelfSignedMinter) -> None:
    bad = StageEndpoints("not-an-arn", STAGE.events_url, STAGE.whip_url)
    with pytest.raises(InvalidTokenRequest):
        await minter.mint(bad, "u", False, True, {}, 60)


def test_minter_refuses_a_key_on_another_curve() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    with pytest.raises(ValueError):
        SelfSignedMinter(ec.generate_private_key(ec.SECP256R1()), KID)


class FakeIvs:
    """Stands in for the boto3 adapter's CreateParticipantToken at the edge."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    async def create_participant_token(self, **kwargs: Any) -> Mapping[str, Any]:
        self.calls.append(kwargs)
        return {
            "participantToken": {
                "token": "header.claims.signature",
                "participantId": "pAbCdEf12345",
                "userId": kwargs["userId"],
                "duration": kwargs["duration"],
                "expirationTime": datetime(2030, 1, 1, 12, 0, tzinfo=UTC),
            },
            "ResponseMetadata": {"HTTPStatusCode": 200},
        }


async def test_api_minter_calls_create_participant_token_and_converts_the_answer() -> None:
    ivs = FakeIvs()
    issued = await ApiMinter(ivs.create_participant_token).mint(
        STAGE, "viewer-1", False, True, {"room": "main"}, 3601
    )
    assert ivs.calls == [
        {
            "stageArn": STAGE.arn,
            "userId": "viewer-1",
            "attributes": {"room": "main"},
            "capabilities": ["SUBSCRIBE"],
            "duration": 61,
        }
    ]
    assert issued == IssuedToken(
        stage_arn=STAGE.arn,
        token="header.claims.signature",
        participant_id="pAbCdEf12345",
        expires_at=datetime(2030, 1, 1, 12, 0, tzinfo=UTC),
    )
    assert "header.claims.signature" not in repr(issued)


@pytest.mark.parametrize(
    ("publish", "subscribe", "caps"), [(True, False, ["PUBLISH"]), (True, True, ["PUBLISH", "SUBSCRIBE"])]
)
async def test_api_minter_capabilities(publish: bool, subscribe: bool, caps: list[str]) -> None:
    ivs = FakeIvs()
    await ApiMinter(ivs.create_participant_token).mint(STAGE, "b", publish, subscribe, {}, 1)
    assert ivs.calls[0]["capabilities"] == caps
    assert ivs.calls[0]["duration"] == 1


async def test_api_minter_treats_a_naive_expiry_as_utc() -> None:
    async def naive(**_: Any) -> Mapping[str, Any]:
        return {
            "participantToken": {"token": "t", "participantId": "p", "expirationTime": datetime(2030, 1, 1)}
        }

    issued = await ApiMinter(naive).mint(STAGE, "u", False, True, {}, 60)
    assert issued.expires_at.utcoffset() == timedelta(0)


async def test_api_minter_rejects_an_unusable_answer_without_quoting_it() -> None:
    async def broken(**_: Any) -> Mapping[str, Any]:
        return {"participantToken": {"token": "secret-token-text", "participantId": "p"}}

    with pytest.raises(TokenServiceError) as caught:
        await ApiMinter(broken).mint(STAGE, "u", False, True, {}, 60)
    assert "secret-token-text" not in str(caught.value)


def test_signing_key_is_created_with_mode_0600_and_then_reused(tmp_path: Path) -> None:
    path = tmp_path / "state" / "keys" / "signing.pem"
    created = load_or_create_private_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["signing.pem"]  # no temporary left behind
    loaded = load_or_create_private_key(path)
    assert jwt_es384.public_key_pem(loaded) == jwt_es384.public_key_pem(created)
    assert jwt_es384.public_key_pem(load_private_key(path)) == jwt_es384.public_key_pem(created)
    token = jwt_es384.sign({"x": 1}, loaded, KID)
    assert jwt_es384.verify(token, created.public_key()) == {"x": 1}


@pytest.mark.parametrize("content", [b"not a key at all", b""])
def test_a_file_that_is_not_a_p384_key_is_an_error_naming_it(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "signing.pem"
    path.write_bytes(content)
    for load in (load_or_create_private_key, load_private_key):
        with pytest.raises(SigningKeyError, match=re.escape(str(path))):
            load(path)


def test_a_key_on_another_curve_is_an_error(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = tmp_path / "signing.pem"
    other = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(SigningKeyError, match="P-384"):
        load_or_create_private_key(path)


def test_aws_mode_key_must_exist(tmp_path: Path) -> None:
    path = tmp_path / "missing.pem"
    with pytest.raises(SigningKeyError, match=re.escape(str(path))):
        load_private_key(path)
    assert not path.exists()
