"""Participants joining the emulator with real tokens, seen through boto3: sessions, states, join checks."""

from __future__ import annotations

import time
from typing import Any

import pytest
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives.asymmetric import ec

from services.common import jwt_es384
from services.ivslocal.config import Settings
from services.ivslocal.errors import (
    ParticipantDisconnectedError,
    StageAtCapacityError,
    StageDeletedError,
    TokenExpiredError,
    TokenMalformedError,
    TokenNotAllowedError,
)
from services.ivslocal.model import ParticipantChange
from tests.integration import ivslocal_fixtures
from tests.integration.ivslocal_fixtures import AsyncIvsClient, IvsLocalServer, running_ivslocal

ivslocal = ivslocal_fixtures.ivslocal


def self_signed(
    key: ec.EllipticCurvePrivateKey,
    kid: str,
    stage_arn: str,
    participant_id: str,
    *,
    publish: bool = False,
    expires_in: float = 3600,
    topic: str | None = None,
    user_id: str | None = None,
) -> str:
    """A token signed the way the allocator signs them (ivs-facts §1.1)."""
    claims: dict[str, Any] = {
        "exp": int(time.time() + expires_in),
        "iat": int(time.time()),
        "jti": participant_id,
        "resource": stage_arn,
        "topic": topic if topic is not None else stage_arn.rsplit("/", 1)[1],
        "events_url": "ws://127.0.0.1/events",
        "whip_url": "http://127.0.0.1/whip",
        "capabilities": {"allow_publish": publish, "allow_subscribe": True},
        "attributes": {"role": "publisher" if publish else "viewer"},
        "version": "1.0",
    }
    if user_id is not None:
        claims["user_id"] = user_id
    return jwt_es384.sign(claims, key, kid)


async def imported_signer(ivs: AsyncIvsClient) -> tuple[ec.EllipticCurvePrivateKey, str]:
    key = jwt_es384.generate_private_key()
    imported = await ivs.import_public_key(publicKeyMaterial=jwt_es384.public_key_pem(key))
    return key, imported["publicKey"]["arn"]


async def api_token(ivs: AsyncIvsClient, stage_arn: str, **kwargs: Any) -> dict[str, Any]:
    return (await ivs.create_participant_token(stageArn=stage_arn, **kwargs))["participantToken"]


async def participants(
    ivs: AsyncIvsClient, stage_arn: str, session_id: str, **filters: Any
) -> dict[str, str]:
    """participantId -> state for every participant of the session, following nextToken."""
    found: dict[str, str] = {}
    kwargs: dict[str, Any] = {"stageArn": stage_arn, "sessionId": session_id, "maxResults": 2, **filters}
    while True:
        page = await ivs.list_participants(**kwargs)
        found.update({p["participantId"]: p["state"] for p in page["participants"]})
        if "nextToken" not in page:
            return found
        kwargs["nextToken"] = page["nextToken"]


async def test_session_lifecycle_through_connect_publish_and_leave(ivslocal: IvsLocalServer) -> None:
    ivs = ivslocal.client()
    stage_arn = (await ivs.create_stage(name="lifecycle"))["stage"]["arn"]
    assert (await ivs.list_stage_sessions(stageArn=stage_arn))["stageSessions"] == []

    publisher_token = await api_token(ivs, stage_arn, userId="broadcaster", capabilities=["PUBLISH"])
    viewer_token = await api_token(
        ivs, stage_arn, userId="viewer-1", capabilities=["SUBSCRIBE"], attributes={"room": "main"}
    )
    publisher = ivslocal.state.connect_participant(publisher_token["token"])
    viewer = ivslocal.state.connect_participant(viewer_token["token"])
    assert publisher.participant_id == publisher_token["participantId"]
    assert viewer.session_id == publisher.session_id

    session_id = (await ivs.get_stage(arn=stage_arn))["stage"]["activeSessionId"]
    assert session_id == publisher.session_id
    assert len(session_id) == 16 and session_id.startswith("st-")
    assert (await ivs.list_stages())["stages"][0]["activeSessionId"] == session_id
    sessions = (await ivs.list_stage_sessions(stageArn=stage_arn))["stageSessions"]
    assert [s["sessionId"] for s in sessions] == [session_id]
    assert "endTime" not in sessions[0]

    listed = (await ivs.list_participants(stageArn=stage_arn, sessionId=session_id))["participants"]
    assert {p["participantId"]: (p["userId"], p["state"], p["published"]) for p in listed} == {
        publisher.participant_id: ("broadcaster", "CONNECTED", False),
        viewer.participant_id: ("viewer-1", "CONNECTED", False),
    }

    ivslocal.state.set_published(stage_arn, publisher.participant_id, True)
    assert await participants(ivs, stage_arn, session_id, filterByPublished=True) == {
        publisher.participant_id: "CONNECTED"
    }
    with pytest.raises(TokenNotAllowedError):
        ivslocal.state.set_published(stage_arn, viewer.participant_id, True)

    detail = (
        await ivs.get_participant(
            stageArn=stage_arn, sessionId=session_id, participantId=viewer.participant_id
        )
    )["participant"]
    assert detail["userId"] == "viewer-1"
    assert detail["attributes"] == {"room": "main"}
    assert detail["state"] == "CONNECTED"
    assert detail["firstJoinTime"].tzinfo is not None

    ivslocal.state.disconnect(stage_arn, viewer.participant_id)
    assert await participants(ivs, stage_arn, session_id, filterByState="DISCONNECTED") == {
        viewer.participant_id: "DISCONNECTED"
    }
    assert await participants(ivs, stage_arn, session_id, filterByUserId="broadcaster") == {
        publisher.participant_id: "CONNECTED"
    }
    assert (await ivs.get_stage(arn=stage_arn))["stage"]["activeSessionId"] == session_id

    # The last one out ends the session (end delay 0 by default).
    ivslocal.state.disconnect(stage_arn, publisher.participant_id)
    assert "activeSessionId" not in (await ivs.get_stage(arn=stage_arn))["stage"]
    assert "activeSessionId" not in (await ivs.list_stages())["stages"][0]
    ended = (await ivs.get_stage_session(stageArn=stage_arn, sessionId=session_id))["stageSession"]
    assert ended["endTime"] >= ended["startTime"]
    assert await participants(ivs, stage_arn, session_id) == {
        publisher.participant_id: "DISCONNECTED",
        viewer.participant_id: "DISCONNECTED",
    }
    assert await participants(ivs, stage_arn, session_id, filterByPublished=True) == {
        publisher.participant_id: "DISCONNECTED"
    }

    # The next join starts a new session, listed first.
    again = ivslocal.state.connect_participant(viewer_token["token"])
    assert again.session_id != session_id
    sessions = (await ivs.list_stage_sessions(stageArn=stage_arn))["stageSessions"]
    assert [s["sessionId"] for s in sessions] == [again.session_id, session_id]
    assert "endTime" not in sessions[0] and "endTime" in sessions[1]


async def test_list_participants_paginates_and_unknown_lookups_fail(ivslocal: IvsLocalServer) -> None:
    ivs = ivslocal.client()
    stage_arn = (await ivs.create_stage())["stage"]["arn"]
    joined = [
        ivslocal.state.connect_participant(
            (await api_token(ivs, stage_arn, capabilities=["SUBSCRIBE"]))["token"]
        )
        for _ in range(5)
    ]
    session_id = joined[0].session_id
    first = await ivs.list_participants(stageArn=stage_arn, sessionId=session_id, maxResults=2)
    assert len(first["participants"]) == 2 and "nextToken" in first
    assert list(await participants(ivs, stage_arn, session_id)) == [p.participant_id for p in joined]

    unknown_session = "st-" + "a" * 13
    with pytest.raises(ClientError) as caught:
        await ivs.get_stage_session(stageArn=stage_arn, sessionId=unknown_session)
    assert caught.value.response["Error"]["Code"] == "ResourceNotFoundException"
    with pytest.raises(ClientError) as caught:
        await ivs.get_participant(stageArn=stage_arn, sessionId=session_id, participantId="nobody")
    assert caught.value.response["Error"]["Code"] == "ResourceNotFoundException"
    assert (await ivs.list_participants(stageArn=stage_arn, sessionId=unknown_session))["participants"] == []


async def test_self_signed_tokens_verify_against_imported_keys(ivslocal: IvsLocalServer) -> None:
    ivs = ivslocal.client()
    stage_arn = (await ivs.create_stage())["stage"]["arn"]
    key, kid = await imported_signer(ivs)
    participant = ivslocal.state.connect_participant(
        self_signed(key, kid, stage_arn, "viewer-abc_1", user_id="u-1")
    )
    assert participant.participant_id == "viewer-abc_1"
    assert participant.user_id == "u-1"
    assert not participant.capabilities.publish and participant.capabilities.subscribe

    # Deleting the public key makes its tokens unusable from then on.
    await ivs.delete_public_key(arn=kid)
    with pytest.raises(TokenNotAllowedError):
        ivslocal.state.connect_participant(self_signed(key, kid, stage_arn, "viewer-abc_2"))


async def test_join_checks_reject_bad_tokens(ivslocal: IvsLocalServer) -> None:
    ivs = ivslocal.client()
    stage_arn = (await ivs.create_stage())["stage"]["arn"]
    other_arn = (await ivs.create_stage())["stage"]["arn"]
    key, kid = await imported_signer(ivs)
    state = ivslocal.state

    with pytest.raises(TokenExpiredError):
        state.connect_participant(self_signed(key, kid, stage_arn, "late", expires_in=-5))
    with pytest.raises(TokenNotAllowedError, match="signature"):
        state.connect_participant(self_signed(jwt_es384.generate_private_key(), kid, stage_arn, "forged"))
    unknown_kid = kid[:-12] + "ZZZZZZZZZZZZ"
    with pytest.raises(TokenNotAllowedError, match="kid"):
        state.connect_participant(self_signed(key, unknown_kid, stage_arn, "stranger"))
    with pytest.raises(TokenNotAllowedError, match="topic"):
        state.connect_participant(
            self_signed(key, kid, stage_arn, "mixed", topic=other_arn.rsplit("/", 1)[1])
        )
    missing = stage_arn[:-12] + "abcdABCDefgh"
    with pytest.raises(TokenNotAllowedError, match="resource"):
        state.connect_participant(self_signed(key, kid, missing, "lost"))
    with pytest.raises(TokenMalformedError):
        state.connect_participant("not.a-jwt")
    with pytest.raises(TokenMalformedError):
        state.connect_participant(self_signed(key, kid, stage_arn, "bad id!"))

    # None of the refused joins started a session.
    assert "activeSessionId" not in (await ivs.get_stage(arn=stage_arn))["stage"]
    assert (await ivs.list_stage_sessions(stageArn=stage_arn))["stageSessions"] == []

    # An API token names its stage too; it is no good for another.
    token = await api_token(ivs, other_arn)
    assert state.connect_participant(token["token"]).stage_arn == other_arn


async def test_twelve_publishers_per_stage() -> None:
    async with running_ivslocal(Settings(port=0, subscriber_quota=2)) as server:
        ivs = server.client()
        stage_arn = (await ivs.create_stage())["stage"]["arn"]
        key, kid = await imported_signer(ivs)
        state = server.state
        for index in range(12):
            state.connect_participant(self_signed(key, kid, stage_arn, f"pub-{index}", publish=True))
        with pytest.raises(StageAtCapacityError):
            state.connect_participant(self_signed(key, kid, stage_arn, "pub-12", publish=True))

        # Subscribers have their own quota (2 here).
        state.connect_participant(self_signed(key, kid, stage_arn, "sub-0"))
        state.connect_participant(self_signed(key, kid, stage_arn, "sub-1"))
        with pytest.raises(StageAtCapacityError):
            state.connect_participant(self_signed(key, kid, stage_arn, "sub-2"))

        # A freed publisher slot can be taken again.
        state.disconnect(stage_arn, "pub-0")
        state.connect_participant(self_signed(key, kid, stage_arn, "pub-12", publish=True))
        session_id = (await ivs.get_stage(arn=stage_arn))["stage"]["activeSessionId"]
        connected = await participants(ivs, stage_arn, session_id, filterByState="CONNECTED")
        assert len(connected) == 14
        assert "pub-0" not in connected and "pub-12" in connected


async def test_same_token_twice_is_one_participant(ivslocal: IvsLocalServer) -> None:
    ivs = ivslocal.client()
    stage_arn = (await ivs.create_stage())["stage"]["arn"]
    token = (await api_token(ivs, stage_arn))["token"]
    first = ivslocal.state.connect_participant(token)
    second = ivslocal.state.connect_participant(token)
    assert second.participant_id == first.participant_id
    assert await participants(ivs, stage_arn, first.session_id) == {first.participant_id: "CONNECTED"}


async def test_disconnect_participant_drops_it_for_good(ivslocal: IvsLocalServer) -> None:
    ivs = ivslocal.client()
    stage_arn = (await ivs.create_stage())["stage"]["arn"]
    changes: list[ParticipantChange] = []
    ivslocal.state.add_listener(changes.append)
    kicked_token = (await api_token(ivs, stage_arn))["token"]
    kicked = ivslocal.state.connect_participant(kicked_token)
    stayer = ivslocal.state.connect_participant((await api_token(ivs, stage_arn))["token"])

    await ivs.disconnect_participant(stageArn=stage_arn, participantId=kicked.participant_id, reason="spam")
    assert await participants(ivs, stage_arn, kicked.session_id) == {
        kicked.participant_id: "DISCONNECTED",
        stayer.participant_id: "CONNECTED",
    }
    assert [(c.kind, c.participant.participant_id, c.reason) for c in changes if c.kind == "left"] == [
        ("left", kicked.participant_id, "participant-disconnected")
    ]
    with pytest.raises(ParticipantDisconnectedError):
        ivslocal.state.connect_participant(kicked_token)

    with pytest.raises(ClientError) as caught:
        await ivs.disconnect_participant(stageArn=stage_arn, participantId="never-joined")
    assert caught.value.response["Error"]["Code"] == "ResourceNotFoundException"


async def test_delete_stage_disconnects_everyone(ivslocal: IvsLocalServer) -> None:
    ivs = ivslocal.client()
    stage_arn = (await ivs.create_stage())["stage"]["arn"]
    changes: list[ParticipantChange] = []
    ivslocal.state.add_listener(changes.append)
    tokens = [(await api_token(ivs, stage_arn))["token"] for _ in range(3)]
    joined = [ivslocal.state.connect_participant(t) for t in tokens]
    ivslocal.state.set_published(stage_arn, joined[0].participant_id, True)

    await ivs.delete_stage(arn=stage_arn)
    left = [(c.participant.participant_id, c.reason) for c in changes if c.kind == "left"]
    assert sorted(left) == sorted((p.participant_id, "stage-deleted") for p in joined)
    assert [c.kind for c in changes].count("unpublished") == 1
    assert all(p.state == "DISCONNECTED" for p in joined)
    with pytest.raises(StageDeletedError):
        ivslocal.state.connect_participant(tokens[0])
