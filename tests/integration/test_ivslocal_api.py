"""The IVS emulator through real boto3 over HTTP: stages, tags, tokens, public keys, errors, quotas, rates."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import jwt
import pytest
import yarl
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from services.common import jwt_es384
from services.ivslocal.config import Settings
from tests.integration import ivslocal_fixtures
from tests.integration.ivslocal_fixtures import IvsLocalServer, running_ivslocal

ivslocal = ivslocal_fixtures.ivslocal

STAGE_ARN = re.compile(r"arn:aws:ivs:us-east-1:123456789012:stage/[a-zA-Z0-9]{12}")
PUBLIC_KEY_ARN = re.compile(r"arn:aws:ivs:us-east-1:123456789012:public-key/[a-zA-Z0-9]{12}")
MISSING_STAGE = "arn:aws:ivs:us-east-1:123456789012:stage/abcdABCDefgh"
P256_PUBLIC_KEY_PEM = (
    ec.generate_private_key(ec.SECP256R1())
    .public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode("ascii")
)


async def error_of(call: Any) -> tuple[str, int, str]:
    """(code, HTTP status, message) of the ClientError the awaited call raises."""
    with pytest.raises(ClientError) as caught:
        await call
    response = caught.value.response
    return (
        response["Error"]["Code"],
        response["ResponseMetadata"]["HTTPStatusCode"],
        response["Error"]["Message"],
    )


def port_of(server: IvsLocalServer) -> int:
    return yarl.URL(server.url).port or 0


# --- stages -------------------------------------------------------------------------------------


async def test_create_get_update_delete_stage(ivslocal: IvsLocalServer) -> None:
    ivs = ivslocal.client()
    created = await ivs.create_stage(name="show-1_a", tags={"fanout:room": "main"})
    stage = created["stage"]
    assert STAGE_ARN.fullmatch(stage["arn"])
    assert stage["name"] == "show-1_a"
    assert stage["tags"] == {"fanout:room": "main"}
    assert "activeSessionId" not in stage
    assert created["participantTokens"] == []
    port = port_of(ivslocal)
    assert stage["endpoints"]["events"] == f"ws://127.0.0.1:{port}/events"
    assert stage["endpoints"]["whip"] == f"http://127.0.0.1:{port}/whip"
    assert stage["endpoints"]["rtmp"].startswith("rtmp://127.0.0.1")
    assert stage["endpoints"]["rtmps"].startswith("rtmps://127.0.0.1")

    fetched = (await ivs.get_stage(arn=stage["arn"]))["stage"]
    assert fetched == stage

    updated = (await ivs.update_stage(arn=stage["arn"], name="renamed"))["stage"]
    assert updated["name"] == "renamed"
    assert updated["endpoints"] == stage["endpoints"]
    assert updated["tags"] == {"fanout:room": "main"}
    assert (await ivs.get_stage(arn=stage["arn"]))["stage"]["name"] == "renamed"

    await ivs.delete_stage(arn=stage["arn"])
    assert await error_of(ivs.get_stage(arn=stage["arn"])) == (
        "ResourceNotFoundException",
        404,
        f"Stage not found: {stage['arn']}",
    )
    assert (await error_of(ivs.delete_stage(arn=stage["arn"])))[:2] == ("ResourceNotFoundException", 404)
    assert (await ivs.list_stages())["stages"] == []


async def test_create_stage_mints_participant_tokens(ivslocal: IvsLocalServer) -> None:
    ivs = ivslocal.client()
    created = await ivs.create_stage(
        participantTokenConfigurations=[
            {"userId": "broadcaster", "capabilities": ["PUBLISH"]},
            {"userId": "viewer", "capabilities": ["SUBSCRIBE"], "duration": 5},
        ]
    )
    tokens = created["participantTokens"]
    assert [t["userId"] for t in tokens] == ["broadcaster", "viewer"]
    assert [t["capabilities"] for t in tokens] == [["PUBLISH"], ["SUBSCRIBE"]]
    assert [t["duration"] for t in tokens] == [720, 5]
    claims = jwt_es384.decode_unverified(tokens[1]["token"])[1]
    assert claims["resource"] == created["stage"]["arn"]
    assert claims["capabilities"] == {"allow_publish": False, "allow_subscribe": True}


async def test_update_and_get_unknown_stage_are_not_found(ivslocal: IvsLocalServer) -> None:
    ivs = ivslocal.client()
    assert (await error_of(ivs.update_stage(arn=MISSING_STAGE, name="x")))[:2] == (
        "ResourceNotFoundException",
        404,
    )
    # The same id in another account is another Stage.
    await ivs.create_stage()
    assert (await error_of(ivs.get_stage(arn=MISSING_STAGE.replace("123456789012", "999999999999"))))[
        0
    ] == "ResourceNotFoundException"


async def test_list_stages_paginates_with_tags_in_summaries(ivslocal: IvsLocalServer) -> None:
    ivs = ivslocal.client()
    created = []
    for index in range(7):
        stage = (await ivs.create_stage(name=f"s{index}", tags={"fanout:index": str(index)}))["stage"]
        created.append(stage["arn"])

    pages = []
    kwargs: dict[str, Any] = {"maxResults": 3}
    while True:
        page = await ivs.list_stages(**kwargs)
        pages.append(page["stages"])
        if "nextToken" not in page:
            break
        kwargs["nextToken"] = page["nextToken"]

    assert [len(p) for p in pages] == [3, 3, 1]
    summaries = [s for p in pages for s in p]
    assert [s["arn"] for s in summaries] == created
    assert [s["tags"] for s in summaries] == [{"fanout:index": str(i)} for i in range(7)]
    assert [s["name"] for s in summaries] == [f"s{i}" for i in range(7)]
    assert all("endpoints" not in s for s in summaries)


async def test_list_stages_defaults_to_50_per_page(ivslocal: IvsLocalServer) -> None:
    for _ in range(51):
        ivslocal.state.create_stage()
    ivs = ivslocal.client()
    first = await ivs.list_stages()
    assert len(first["stages"]) == 50
    second = await ivs.list_stages(nextToken=first["nextToken"])
    assert len(second["stages"]) == 1
    assert "nextToken" not in second


async def test_stage_quota_answers_402_service_quota_exceeded() -> None:
    async with running_ivslocal(Settings(port=0, stage_quota=2)) as server:
        ivs = server.client()
        first = (await ivs.create_stage())["stage"]
        await ivs.create_stage()
        code, status, message = await error_of(ivs.create_stage())
        assert (code, status) == ("ServiceQuotaExceededException", 402)
        assert message
        assert len((await ivs.list_stages())["stages"]) == 2
        await ivs.delete_stage(arn=first["arn"])
        await ivs.create_stage()


# --- tags ---------------------------------------------------------------------------------------


async def test_tag_operations_on_stage(ivslocal: IvsLocalServer) -> None:
    ivs = ivslocal.client()
    arn = (await ivs.create_stage(tags={"a": "1", "b": "2"}))["stage"]["arn"]
    await ivs.tag_resource(resourceArn=arn, tags={"b": "two", "c": "3"})
    assert (await ivs.list_tags_for_resource(resourceArn=arn))["tags"] == {"a": "1", "b": "two", "c": "3"}
    await ivs.untag_resource(resourceArn=arn, tagKeys=["a", "c", "never-set"])
    assert (await ivs.list_tags_for_resource(resourceArn=arn))["tags"] == {"b": "two"}
    assert (await ivs.list_stages())["stages"][0]["tags"] == {"b": "two"}

    # boto3 percent-encodes the ARN; a hand-made request with the raw encoding reaches the same Stage.
    encoded = arn.replace(":", "%3A").replace("/", "%2F")
    url = yarl.URL(f"{ivslocal.url}/tags/{encoded}", encoded=True)
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200
        assert await response.json() == {"tags": {"b": "two"}}


async def test_tag_operations_errors(ivslocal: IvsLocalServer) -> None:
    ivs = ivslocal.client()
    assert (await error_of(ivs.list_tags_for_resource(resourceArn=MISSING_STAGE)))[:2] == (
        "ResourceNotFoundException",
        404,
    )
    assert (await error_of(ivs.tag_resource(resourceArn=MISSING_STAGE, tags={"a": "b"})))[0] == (
        "ResourceNotFoundException"
    )
    assert (await error_of(ivs.tag_resource(resourceArn="not-an-arn", tags={"a": "b"})))[:2] == (
        "ValidationException",
        400,
    )
    arn = (await ivs.create_stage(tags={f"k{i}": "v" for i in range(50)}))["stage"]["arn"]
    assert (await error_of(ivs.tag_resource(resourceArn=arn, tags={"one-too-many": "v"})))[0] == (
        "ValidationException"
    )


# --- validation and protocol errors -------------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "kwargs"),
    [
        ("create_stage", {"name": "has space"}),
        ("create_stage", {"name": "ünïcode"}),
        ("get_stage", {"arn": "not-an-arn"}),
        ("get_stage", {"arn": "arn:aws:ivs:us-east-1:123456789012:channel/abcdABCDefgh"}),
        ("update_stage", {"arn": MISSING_STAGE, "name": "bad/name"}),
        ("create_participant_token", {"stageArn": "arn:aws:s3:::bucket"}),
        ("get_public_key", {"arn": MISSING_STAGE}),
        ("list_stages", {"nextToken": "garbage"}),
        ("get_stage_session", {"stageArn": MISSING_STAGE, "sessionId": "xx-abcdefghijklm"}),
        (
            "get_participant",
            {"stageArn": MISSING_STAGE, "sessionId": "st-abcdefghijklm", "participantId": "a b"},
        ),
        (
            "list_participants",
            {"stageArn": MISSING_STAGE, "sessionId": "st-abcdefghijklm", "filterByState": "GONE"},
        ),
        (
            "list_participants",
            {"stageArn": MISSING_STAGE, "sessionId": "st-abcdefghijklm", "filterByRecordingState": "ON"},
        ),
        (
            "list_participants",
            {
                "stageArn": MISSING_STAGE,
                "sessionId": "st-abcdefghijklm",
                "filterByUserId": "u",
                "filterByPublished": True,
            },
        ),
        (
            "list_participants",
            {
                "stageArn": MISSING_STAGE,
                "sessionId": "st-abcdefghijklm",
                "filterByState": "CONNECTED",
                "filterByPublished": False,
            },
        ),
    ],
)
async def test_patterns_enums_and_filters_are_validated_by_the_server(
    ivslocal: IvsLocalServer, operation: str, kwargs: dict[str, Any]
) -> None:
    code, status, message = await error_of(getattr(ivslocal.client(), operation)(**kwargs))
    assert (code, status) == ("ValidationException", 400)
    assert message


async def test_bad_capability_is_a_validation_error(ivslocal: IvsLocalServer) -> None:
    ivs = ivslocal.client()
    arn = (await ivs.create_stage())["stage"]["arn"]
    assert (await error_of(ivs.create_participant_token(stageArn=arn, capabilities=["WATCH"])))[:2] == (
        "ValidationException",
        400,
    )
    assert (await error_of(ivs.create_stage(participantTokenConfigurations=[{"capabilities": ["ADMIN"]}])))[
        0
    ] == "ValidationException"
    assert (await ivs.list_stages())["stages"][0]["arn"] == arn


async def post_raw(
    server: IvsLocalServer, path: str, data: bytes, method: str = "POST"
) -> tuple[int, Any, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, server.url + path, data=data, headers={"Content-Type": "application/json"}) as r,
    ):
        return r.status, r.headers.get("x-amzn-ErrorType"), await r.json(content_type=None)


async def test_missing_session_id_is_a_validation_error(ivslocal: IvsLocalServer) -> None:
    # boto3 refuses to send this, so ask over plain HTTP, as a non-boto3 client could.
    status, code, body = await post_raw(
        ivslocal, "/ListParticipants", b'{"stageArn": "%s"}' % MISSING_STAGE.encode()
    )
    assert (status, code) == (400, "ValidationException")
    assert "sessionId" in body["message"]
    assert body["exceptionMessage"] == body["message"]
    short = b'{"stageArn": "%s", "sessionId": "st-abc"}' % MISSING_STAGE.encode()
    assert (await post_raw(ivslocal, "/ListParticipants", short))[:2] == (400, "ValidationException")
    too_many = b'{"maxResults": 101}'
    assert (await post_raw(ivslocal, "/ListStages", too_many))[:2] == (400, "ValidationException")


@pytest.mark.parametrize("data", [b"{not json", b"[1, 2]", b'"text"', b'{"arn": 42}', b"\xff\xfe"])
async def test_malformed_bodies_are_validation_errors(ivslocal: IvsLocalServer, data: bytes) -> None:
    status, code, body = await post_raw(ivslocal, "/GetStage", data)
    assert (status, code) == (400, "ValidationException")
    assert body["message"] and body["exceptionMessage"] == body["message"]


async def test_unknown_operations_and_paths_answer_404_json(ivslocal: IvsLocalServer) -> None:
    assert (await post_raw(ivslocal, "/LaunchRocket", b"{}"))[:2] == (404, "UnknownOperationException")
    assert (await post_raw(ivslocal, "/GetStage", b"", method="GET"))[:2] == (
        404,
        "UnknownOperationException",
    )
    assert (await post_raw(ivslocal, "/a/b/c", b"{}"))[:2] == (404, "UnknownOperationException")


async def test_not_found_message_reaches_boto3(ivslocal: IvsLocalServer) -> None:
    ivs = ivslocal.client()
    with pytest.raises(ivs.sync.exceptions.ResourceNotFoundException) as caught:
        await ivs.get_stage(arn=MISSING_STAGE)
    assert MISSING_STAGE in str(caught.value)


# --- participant tokens -------------------------------------------------------------------------


async def test_create_participant_token_is_an_es384_jwt_with_ivs_claims(ivslocal: IvsLocalServer) -> None:
    ivs = ivslocal.client()
    stage = (await ivs.create_stage())["stage"]
    before = datetime.now(UTC)
    issued = (
        await ivs.create_participant_token(
            stageArn=stage["arn"],
            userId="viewer-7",
            attributes={"room": "main", "role": "viewer"},
            duration=30,
        )
    )["participantToken"]
    assert issued["userId"] == "viewer-7"
    assert issued["attributes"] == {"room": "main", "role": "viewer"}
    assert issued["duration"] == 30
    assert issued["capabilities"] == ["PUBLISH", "SUBSCRIBE"]
    assert re.fullmatch(r"[a-zA-Z0-9]{12}", issued["participantId"])
    assert isinstance(issued["expirationTime"], datetime)
    assert before + timedelta(minutes=29) < issued["expirationTime"] <= before + timedelta(minutes=31)

    async with aiohttp.ClientSession() as http, http.get(ivslocal.url + "/_emulator/token-key") as response:
        key_info = await response.json()
    assert key_info["publicKeyPem"] == ivslocal.state.token_public_key_pem
    header = jwt.get_unverified_header(issued["token"])
    assert header["alg"] == "ES384"
    assert header["kid"] == key_info["kid"]
    claims = jwt.decode(issued["token"], key_info["publicKeyPem"], algorithms=["ES384"])
    assert claims["jti"] == issued["participantId"]
    assert claims["resource"] == stage["arn"]
    assert claims["topic"] == stage["arn"].rsplit("/", 1)[1]
    assert claims["events_url"] == stage["endpoints"]["events"]
    assert claims["whip_url"] == stage["endpoints"]["whip"]
    assert claims["user_id"] == "viewer-7"
    assert claims["attributes"] == {"room": "main", "role": "viewer"}
    assert claims["capabilities"] == {"allow_publish": True, "allow_subscribe": True}
    assert claims["version"] == "1.0"
    assert claims["exp"] == int(issued["expirationTime"].timestamp())
    assert claims["exp"] - claims["iat"] == 30 * 60

    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(
            issued["token"], jwt_es384.public_key_pem(jwt_es384.generate_private_key()), algorithms=["ES384"]
        )


async def test_create_participant_token_defaults_and_errors(ivslocal: IvsLocalServer) -> None:
    ivs = ivslocal.client()
    arn = (await ivs.create_stage())["stage"]["arn"]
    issued = (await ivs.create_participant_token(stageArn=arn, capabilities=["SUBSCRIBE"]))[
        "participantToken"
    ]
    assert issued["duration"] == 720
    assert issued["capabilities"] == ["SUBSCRIBE"]
    claims = jwt_es384.decode_unverified(issued["token"])[1]
    assert claims["capabilities"] == {"allow_publish": False, "allow_subscribe": True}
    assert (await error_of(ivs.create_participant_token(stageArn=MISSING_STAGE)))[:2] == (
        "ResourceNotFoundException",
        404,
    )
    too_big = {"a": "x" * 1100}
    assert (await error_of(ivs.create_participant_token(stageArn=arn, attributes=too_big)))[0] == (
        "ValidationException"
    )


# --- public keys --------------------------------------------------------------------------------


def new_public_key_pem() -> str:
    return jwt_es384.public_key_pem(jwt_es384.generate_private_key())


async def test_public_key_import_get_list_delete(ivslocal: IvsLocalServer) -> None:
    ivs = ivslocal.client()
    pem = new_public_key_pem()
    imported = (await ivs.import_public_key(publicKeyMaterial=pem, name="signer-1", tags={"k": "v"}))[
        "publicKey"
    ]
    assert PUBLIC_KEY_ARN.fullmatch(imported["arn"])
    assert imported["name"] == "signer-1"
    assert imported["publicKeyMaterial"] == pem
    assert imported["tags"] == {"k": "v"}
    assert re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2})+", imported["fingerprint"])

    assert (await ivs.get_public_key(arn=imported["arn"]))["publicKey"] == imported
    assert (await ivs.list_public_keys())["publicKeys"] == [
        {"arn": imported["arn"], "name": "signer-1", "tags": {"k": "v"}}
    ]
    assert (await ivs.list_tags_for_resource(resourceArn=imported["arn"]))["tags"] == {"k": "v"}

    await ivs.delete_public_key(arn=imported["arn"])
    assert (await error_of(ivs.get_public_key(arn=imported["arn"])))[:2] == ("ResourceNotFoundException", 404)
    assert (await error_of(ivs.delete_public_key(arn=imported["arn"])))[0] == "ResourceNotFoundException"
    assert (await ivs.list_public_keys())["publicKeys"] == []


async def test_public_key_quota_and_duplicate(ivslocal: IvsLocalServer) -> None:
    ivs = ivslocal.client()
    first_pem = new_public_key_pem()
    first = (await ivs.import_public_key(publicKeyMaterial=first_pem))["publicKey"]
    code, status, _ = await error_of(ivs.import_public_key(publicKeyMaterial=first_pem, name="again"))
    assert (code, status) == ("ConflictException", 409)

    for _ in range(2):
        await ivs.import_public_key(publicKeyMaterial=new_public_key_pem())
    code, status, _ = await error_of(ivs.import_public_key(publicKeyMaterial=new_public_key_pem()))
    assert (code, status) == ("ServiceQuotaExceededException", 402)

    paginator = ivs.sync.get_paginator("list_public_keys")
    pages = await asyncio.to_thread(lambda: list(paginator.paginate(PaginationConfig={"PageSize": 2})))
    assert [len(p["publicKeys"]) for p in pages] == [2, 1]

    await ivs.delete_public_key(arn=first["arn"])
    await ivs.import_public_key(publicKeyMaterial=first_pem)


@pytest.mark.parametrize(
    "material",
    [
        "not a key",
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        # A P-256 key parses as PEM but IVS wants P-384.
        P256_PUBLIC_KEY_PEM,
    ],
)
async def test_bad_public_key_material_is_a_validation_error(ivslocal: IvsLocalServer, material: str) -> None:
    ivs = ivslocal.client()
    assert (await error_of(ivs.import_public_key(publicKeyMaterial=material)))[:2] == (
        "ValidationException",
        400,
    )
    assert (await ivs.list_public_keys())["publicKeys"] == []


# --- call rates and stats -----------------------------------------------------------------------


async def test_rate_limits_throttle_excess_calls_with_429() -> None:
    async with running_ivslocal(Settings(port=0, rate_limits=True)) as server:
        ivs = server.client(retries=False)
        arn = (await ivs.create_stage())["stage"]["arn"]
        outcomes = []
        for _ in range(15):
            try:
                await ivs.get_stage(arn=arn)
                outcomes.append("ok")
            except ClientError as error:
                outcomes.append(error.response["Error"]["Code"])
                assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 429
        # A 5-per-second bucket lets about five through, then throttles until it refills.
        assert outcomes[:5] == ["ok"] * 5
        assert "ThrottlingException" in outcomes
        assert set(outcomes) == {"ok", "ThrottlingException"}
        assert server.stats.throttles["GetStage"] == outcomes.count("ThrottlingException")
        assert server.stats.calls["GetStage"] == 15
        # Buckets are per operation: tokens (50 per second) are still available.
        await ivs.create_participant_token(stageArn=arn)

        async with aiohttp.ClientSession() as http, http.get(server.url + "/_emulator/stats") as response:
            stats = await response.json()
        assert stats["throttles"]["GetStage"] == outcomes.count("ThrottlingException")
        assert stats["errors"]["GetStage"] == {"ThrottlingException": outcomes.count("ThrottlingException")}


async def test_rate_limits_are_off_by_default(ivslocal: IvsLocalServer) -> None:
    ivs = ivslocal.client(retries=False)
    arn = (await ivs.create_stage())["stage"]["arn"]
    for _ in range(25):
        await ivs.get_stage(arn=arn)
    assert ivslocal.stats.calls["GetStage"] == 25
    assert ivslocal.stats.throttles == {}
