"""Viewers through the whole path (HTTP -> gateway -> allocator -> signed token), real services."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import aiohttp
import jwt

from services.common.jwt_es384 import decode_unverified
from tests.integration.system import System, running_system
from tests.integration.waiting import eventually


async def start_show(http: aiohttp.ClientSession, system: System, room: str = "main") -> dict:
    async with http.post(
        f"{system.gateway_url}/api/token/publisher-all",
        json={"room": room},
        headers=system.publisher_headers(),
    ) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def room_info(http: aiohttp.ClientSession, system: System, room: str = "main") -> dict:
    async with http.get(f"{system.gateway_url}/api/rooms/{room}") as response:
        assert response.status == 200
        return await response.json()


def imported_public_key(system: System, kid: str) -> str:
    return system.ivs.boto3_client().get_public_key(arn=kid)["publicKey"]["publicKeyMaterial"]


async def test_publisher_all_creates_the_room_and_returns_publish_tokens(tmp_path: Path) -> None:
    async with running_system(tmp_path, FANOUT_MIN_STAGES="2") as system, aiohttp.ClientSession() as http:
        body = await start_show(http, system, room="launch")
        again = await start_show(http, system, room="launch")
        info = await room_info(http, system, room="launch")
        assert body["room"] == "launch"
        assert len(body["tokens"]) == 2 and {t["state"] for t in body["tokens"]} == {"STANDBY"}
        assert [t["stageArn"] for t in again["tokens"]] == [t["stageArn"] for t in body["tokens"]]
        assert [s["stageArn"] for s in info["stages"]] == [t["stageArn"] for t in body["tokens"]]
        token = body["tokens"][0]
        header, _ = decode_unverified(token["token"])
        public_pem = await asyncio.to_thread(imported_public_key, system, header["kid"])
        claims = jwt.decode(token["token"], public_pem, algorithms=["ES384"])
        assert claims["capabilities"] == {"allow_publish": True, "allow_subscribe": False}
        assert claims["resource"] == token["stageArn"]
        assert claims["topic"] == token["stageArn"].rsplit("/", 1)[1]
        assert claims["jti"] == token["participantId"]
        assert claims["attributes"] == {"room": "launch", "role": "publisher"}
        assert body["tokens"][0]["participantId"] != again["tokens"][0]["participantId"]


async def test_viewer_gets_a_subscribe_only_token_and_is_sticky(system: System) -> None:
    async with aiohttp.ClientSession() as http:
        await start_show(http, system)
        async with http.post(f"{system.gateway_url}/api/token/viewer", json={"userId": "v1"}) as response:
            first = await response.json()
        async with http.post(f"{system.gateway_url}/api/token/viewer", json={"userId": "v1"}) as response:
            second = await response.json()
        info = await room_info(http, system)
    assert first["stageArn"] == second["stageArn"]
    assert first["token"] != second["token"] and first["participantId"] != second["participantId"]
    assert info["viewers"] == 1
    header, _ = decode_unverified(first["token"])
    public_pem = await asyncio.to_thread(imported_public_key, system, header["kid"])
    claims = jwt.decode(first["token"], public_pem, algorithms=["ES384"])
    assert claims["capabilities"] == {"allow_publish": False, "allow_subscribe": True}
    assert claims["user_id"] == "v1" and claims["resource"] == first["stageArn"]
    assert claims["exp"] > time.time() + 3600
    assert first["leaseSeconds"] == 60
    assert first["tier"] == second["tier"] == "realtime"


async def test_a_missing_user_id_is_generated(system: System) -> None:
    async with aiohttp.ClientSession() as http:
        await start_show(http, system)
        async with http.post(f"{system.gateway_url}/api/token/viewer", json={}) as response:
            body = await response.json()
    assert response.status == 200
    assert body["userId"] and body["stageArn"]


async def test_500_concurrent_viewers_are_balanced_within_capacity(tmp_path: Path) -> None:
    # A fixed pool of 3 Stages x soft 100 = 300 < 450 distinct viewers: the rest must overflow
    # evenly, up to hard 200.
    async with running_system(
        tmp_path,
        FANOUT_MIN_STAGES="3",
        FANOUT_MAX_STAGES_PER_ROOM="3",
        FANOUT_STAGE_CAPACITY="100",
        FANOUT_STAGE_HARD_LIMIT="200",
    ) as system:
        connector = aiohttp.TCPConnector(limit=100)
        async with aiohttp.ClientSession(connector=connector) as http:
            await start_show(http, system)
            user_ids = [f"viewer-{i % 450}" for i in range(500)]

            async def join(user_id: str) -> tuple[str, int, str]:
                async with http.post(
                    f"{system.gateway_url}/api/token/viewer", json={"userId": user_id}
                ) as response:
                    body = await response.json()
                    return user_id, response.status, body.get("stageArn", "")

            results = await asyncio.gather(*(join(u) for u in user_ids))
            info = await room_info(http, system)
    assert {status for _, status, _ in results} == {200}
    stage_of: dict[str, set[str]] = {}
    for user_id, _, arn in results:
        stage_of.setdefault(user_id, set()).add(arn)
    assert all(len(arns) == 1 for arns in stage_of.values()), "a repeated viewer kept its Stage"
    per_stage = Counter(next(iter(arns)) for arns in stage_of.values())
    assert sum(per_stage.values()) == 450 == info["viewers"]
    assert {s["stageArn"]: s["viewers"] for s in info["stages"]} == dict(per_stage)
    assert max(per_stage.values()) - min(per_stage.values()) <= 1, per_stage
    assert max(per_stage.values()) <= 200


async def test_viewers_are_refused_with_retry_after_only_at_the_hard_limit(tmp_path: Path) -> None:
    async with (
        running_system(
            tmp_path,
            FANOUT_MIN_STAGES="2",
            FANOUT_MAX_STAGES_PER_ROOM="2",
            FANOUT_STAGE_CAPACITY="2",
            FANOUT_STAGE_HARD_LIMIT="3",
        ) as system,
        aiohttp.ClientSession() as http,
    ):
        await start_show(http, system)
        statuses = []
        for i in range(8):
            async with http.post(
                f"{system.gateway_url}/api/token/viewer", json={"userId": f"u{i}"}
            ) as response:
                statuses.append(response.status)
                if response.status == 503:
                    refused = await response.json()
                    retry_after = response.headers.get("Retry-After")
        info = await room_info(http, system)
    assert statuses == [200] * 6 + [503] * 2
    # Both Stages the room may have are full: the refusal names the limit that binds.
    assert refused["error"]["code"] == "capacity_exhausted"
    assert "FANOUT_MAX_STAGES_PER_ROOM=2" in refused["error"]["message"], refused
    assert retry_after is not None and int(retry_after) > 0
    assert info["viewers"] == 6 and all(s["viewers"] == 3 for s in info["stages"])


async def test_live_stages_take_viewers_before_standby_ones(tmp_path: Path) -> None:
    async with running_system(tmp_path, FANOUT_MIN_STAGES="2") as system, aiohttp.ClientSession() as http:
        tokens = (await start_show(http, system))["tokens"]
        live_arn = tokens[1]["stageArn"]
        async with http.post(
            f"{system.gateway_url}/api/rooms/main/publisher/status",
            json={"stageArn": live_arn, "publishing": True},
            headers=system.publisher_headers(),
        ) as response:
            assert response.status == 204

        async def allocator_sees_live() -> bool:
            # publisher-all reports each Stage's state as the allocator knows it.
            return any(t["state"] == "LIVE" for t in (await start_show(http, system))["tokens"])

        await eventually(allocator_sees_live, what="the allocator to see the LIVE Stage")
        placed = []
        for i in range(4):
            async with http.post(
                f"{system.gateway_url}/api/token/viewer", json={"userId": f"u{i}"}
            ) as response:
                placed.append((await response.json())["stageArn"])
        info = await room_info(http, system)
    assert placed == [live_arn] * 4
    assert [s["state"] for s in info["stages"]] == ["STANDBY", "LIVE"]


async def test_heartbeat_renews_leave_releases_and_expired_leases_are_reaped(tmp_path: Path) -> None:
    async with (
        running_system(tmp_path, FANOUT_VIEWER_LEASE_SECONDS="5") as system,
        aiohttp.ClientSession() as http,
    ):
        await start_show(http, system)
        for user in ("stays", "leaves", "lapses"):
            async with http.post(f"{system.gateway_url}/api/token/viewer", json={"userId": user}) as response:
                assert response.status == 200
        async with http.post(
            f"{system.gateway_url}/api/viewer/leave", json={"room": "main", "userId": "leaves"}
        ) as response:
            assert response.status == 204
        assert (await room_info(http, system))["viewers"] == 2
        for _ in range(4):
            await asyncio.sleep(1.5)
            async with http.post(
                f"{system.gateway_url}/api/viewer/heartbeat", json={"room": "main", "userId": "stays"}
            ) as response:
                assert response.status == 200
                assert (await response.json())["leaseSeconds"] == 5
        info = await room_info(http, system)
        async with http.post(
            f"{system.gateway_url}/api/viewer/heartbeat", json={"room": "main", "userId": "lapses"}
        ) as response:
            lapsed = response.status, (await response.json())["error"]["code"]
    assert info["viewers"] == 1, "the lease nobody renewed expired after 5 s"
    assert lapsed == (404, "lease_not_found")
