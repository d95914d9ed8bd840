"""The monitor against the real system: what IVS sees reaches placement and Stage states, within budget."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from protos.fanout.v1 import allocator_pb2, common_pb2, stagemanager_pb2
from services.ivslocal.config import Settings as IvsSettings
from services.ivslocal.model import TokenRequest
from services.monitor.consumer import MAX_BACKOFF_SECONDS
from tests.integration.monitor_fixtures import (
    LocalSqsQueue,
    new_queue_name,
    reading_events_from,
    running_monitor,
    running_sqs_queue,
)
from tests.integration.system import System, running_system
from tests.integration.waiting import eventually
from tests.ports import free_port

LIVE, STANDBY = common_pb2.STAGE_STATE_LIVE, common_pb2.STAGE_STATE_STANDBY
# How long an event may take to reach the Stage's state. Whatever it is, the tests that poll once a minute
# prove the event path by the monitor's single pass; this is only well short of the next one, and
# generous for a loaded machine (the long poll, moto's server and the reports share a CPU).
EVENT_WITHIN_SECONDS = 20
VISIBILITY_TIMEOUT_SECONDS = 10


async def start_show(http: aiohttp.ClientSession, system: System) -> list[dict[str, Any]]:
    async with http.post(
        f"{system.gateway_url}/api/token/publisher-all", json={}, headers=system.publisher_headers()
    ) as response:
        assert response.status == 200
        return list((await response.json())["tokens"])


async def place_viewer(http: aiohttp.ClientSession, system: System, user_id: str) -> dict[str, Any]:
    async with http.post(f"{system.gateway_url}/api/token/viewer", json={"userId": user_id}) as response:
        assert response.status == 200
        return dict(await response.json())


async def stage_states(system: System) -> list[int]:
    room = await system.stagemanager.GetRoom(stagemanager_pb2.GetRoomRequest(room="main"))
    return [stage.state for stage in sorted(room.room.stages, key=lambda s: s.index)]


def join_directly(system: System, stage_arn: str, count: int, publish: bool = False) -> list[str]:
    """Participants with emulator-minted tokens (no HTTP call, so no call against the rate limits)."""
    capabilities = ["PUBLISH", "SUBSCRIBE"] if publish else ["SUBSCRIBE"]
    ids = []
    for _ in range(count):
        issued = system.ivs.state.create_participant_token(stage_arn, TokenRequest(capabilities=capabilities))
        participant = system.ivs.state.connect_participant(issued.token)
        if publish:
            system.ivs.state.set_published(stage_arn, participant.participant_id, True)
        ids.append(participant.participant_id)
    return ids


async def test_observed_viewers_and_publisher_presence_reach_the_allocator_and_stage_manager(
    tmp_path: Path,
) -> None:
    async with (
        running_system(tmp_path, FANOUT_MIN_STAGES="2", FANOUT_PUBLISHER_GRACE_SECONDS="1") as system,
        aiohttp.ClientSession() as http,
    ):
        first, second = await start_show(http, system)
        viewers = [await place_viewer(http, system, f"viewer-{i}") for i in range(7)]
        # Six viewers really join with their tokens; the seventh holds a lease but never shows up.
        for viewer in viewers[:6]:
            system.ivs.state.connect_participant(viewer["token"])
        joined = {first["stageArn"]: 0, second["stageArn"]: 0}
        leased = dict(joined)
        for i, viewer in enumerate(viewers):
            leased[viewer["stageArn"]] += 1
            joined[viewer["stageArn"]] += i < 6
        publisher = system.ivs.state.connect_participant(first["token"])
        system.ivs.state.set_published(first["stageArn"], publisher.participant_id, True)
        foreign = await asyncio.to_thread(
            system.ivs.boto3_client().create_stage,
            name="other-cluster",
            tags={
                "fanout:cluster": "other",
                "fanout:room": "main",
                "fanout:index": "0",
                "fanout:role": "origin",
            },
        )
        join_directly(system, foreign["stage"]["arn"], 3)
        assert await stage_states(system) == [STANDBY, STANDBY]

        async with running_monitor(system) as monitor:

            async def occupancy_observed() -> dict[str, allocator_pb2.StageOccupancy] | None:
                result = await system.allocator.GetOccupancy(allocator_pb2.GetOccupancyRequest(room="main"))
                by_arn = {s.stage_arn: s for s in result.stages}
                return by_arn if all(by_arn[a].observed == n for a, n in joined.items()) else None

            occupancy = await eventually(occupancy_observed, what="observed viewers in the allocator")
            for arn, stage in occupancy.items():
                assert (stage.leased, stage.observed, stage.viewers) == (
                    leased[arn],
                    joined[arn],
                    max(leased[arn], joined[arn]),
                )
            drift_stage = next(a for a in leased if leased[a] != joined[a])
            allocator_metric = system.registries["allocator"].get_sample_value

            await eventually(
                lambda: (
                    allocator_metric(
                        "fanout_occupancy_drift", {"room": "main", "stage": drift_stage.rsplit("/", 1)[1]}
                    )
                    == 1
                ),
                what="drift = leased - observed in the allocator's metrics",
            )
            # LIVE from the observation alone: nobody called ReportPublisherStatus.
            await eventually(
                lambda: _states_are(system, [LIVE, STANDBY]), what="the publishing Stage confirmed LIVE"
            )

            first_id = first["stageArn"].rsplit("/", 1)[1]
            assert monitor.metric("fanout_monitor_stages") == 2
            assert monitor.metric("fanout_monitor_account_stages") == 3
            assert monitor.metric("fanout_ivs_stage_quota") == 1000
            assert (
                monitor.metric(
                    "fanout_monitor_observed_participants", room="main", stage=first_id, role="publisher"
                )
                == 1
            )
            assert (
                monitor.metric(
                    "fanout_monitor_observed_participants", room="main", stage=first_id, role="subscriber"
                )
                == joined[first["stageArn"]]
            )
            other_id = foreign["stage"]["arn"].rsplit("/", 1)[1]
            assert (
                monitor.metric("fanout_monitor_stage_refresh_age_seconds", room="main", stage=other_id)
                is None
            )
            age = monitor.metric("fanout_monitor_stage_refresh_age_seconds", room="main", stage=first_id)
            assert age is not None and age < 2
            assert (monitor.metric("fanout_monitor_cycle_seconds_count") or 0) >= 1
            assert (
                monitor.metric("fanout_ivs_calls_total", operation="ListParticipants", outcome="ok") or 0
            ) >= 2

            # The broadcaster's browser goes away: flagged once the stage manager's grace has passed.
            system.ivs.state.disconnect(first["stageArn"], publisher.participant_id)
            await eventually(
                lambda: _states_are(system, [STANDBY, STANDBY]),
                what="the vanished publisher flagged",
                within=8,
            )
            assert (monitor.metric("fanout_monitor_report_failures_total", target="allocator") or 0) == 0


async def _states_are(system: System, states: list[int]) -> bool:
    return await stage_states(system) == states


async def test_within_the_rate_limits_the_monitor_is_never_throttled_and_ages_stay_bounded(
    tmp_path: Path,
) -> None:
    async with running_system(
        tmp_path, ivs_settings=IvsSettings(port=0, rate_limits=True), FANOUT_MIN_STAGES="3"
    ) as system:
        room = await system.stagemanager.EnsureRoom(stagemanager_pb2.EnsureRoomRequest(room="main"))
        big, small, idle = (s.arn for s in sorted(room.room.stages, key=lambda s: s.index))
        join_directly(system, big, 1, publish=True)
        join_directly(system, big, 349)  # 4 pages of 100
        join_directly(system, small, 30)
        stage = {arn: arn.rsplit("/", 1)[1] for arn in (big, small, idle)}

        async with running_monitor(system, FANOUT_MONITOR_PAGES_PER_TURN="1") as monitor:
            worst = dict.fromkeys(stage.values(), 0.0)
            started = time.monotonic()
            while time.monotonic() - started < 5:
                for stage_id in stage.values():
                    age = monitor.metric(
                        "fanout_monitor_stage_refresh_age_seconds", room="main", stage=stage_id
                    )
                    assert age is not None
                    worst[stage_id] = max(worst[stage_id], age)
                await asyncio.sleep(0.05)

            def observed(arn: str, role: str) -> float | None:
                return monitor.metric(
                    "fanout_monitor_observed_participants", room="main", stage=stage[arn], role=role
                )

            assert (observed(big, "publisher"), observed(big, "subscriber")) == (1, 349)
            assert (observed(small, "publisher"), observed(small, "subscriber")) == (0, 30)
            assert (observed(idle, "publisher"), observed(idle, "subscriber")) == (0, 0)
            calls = system.ivs.stats.calls["ListParticipants"]
            throttles = sum(system.ivs.stats.throttles.values())
            cycles = monitor.metric("fanout_monitor_cycle_seconds_count") or 0
            cycle_seconds = (monitor.metric("fanout_monitor_cycle_seconds_sum") or 0) / max(cycles, 1)

        print(
            f"\nrate limits on, 1 page per Stage per pass: {calls} ListParticipants in ~5 s, "
            f"{throttles} throttled, {cycles:.0f} passes of {cycle_seconds:.2f} s on average, worst refresh "
            f"age: big (4 pages) {worst[stage[big]]:.2f} s, small {worst[stage[small]]:.2f} s, "
            f"idle {worst[stage[idle]]:.2f} s"
        )
        assert throttles == 0, system.ivs.stats.as_dict()
        # Two ListParticipants per pass at 5/s: 0.4 s a pass; the 4-page Stage completes every 4 passes.
        assert worst[stage[small]] < 1.5
        assert worst[stage[big]] < 3.0
        assert worst[stage[idle]] < 1.5
        assert calls <= 5 * 6  # never above 5/s, over at most 6 s since the monitor started


async def test_a_report_target_that_is_down_costs_nothing_but_its_reports(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{sock.getsockname()[1]}"
    async with running_system(tmp_path) as system, aiohttp.ClientSession() as http:
        (token,) = await start_show(http, system)
        publisher = system.ivs.state.connect_participant(token["token"])
        system.ivs.state.set_published(token["stageArn"], publisher.participant_id, True)
        async with running_monitor(system, FANOUT_ALLOCATOR_ADDR=nobody) as monitor:
            await eventually(
                lambda: _states_are(system, [LIVE]), what="LIVE despite the allocator being down"
            )
            await eventually(
                lambda: (
                    (monitor.metric("fanout_monitor_report_failures_total", target="allocator") or 0) >= 2
                ),
                what="failed reports counted and retried",
            )
            passes = monitor.metric("fanout_monitor_cycle_seconds_count") or 0
            await eventually(
                lambda: (monitor.metric("fanout_monitor_cycle_seconds_count") or 0) > passes + 2,
                what="passes going on",
            )
            assert await monitor.serving()
            assert not monitor.metric("fanout_monitor_report_failures_total", target="stagemanager")


@pytest.fixture
def sqs_queue() -> Iterator[LocalSqsQueue]:
    # A short visibility timeout, as the consumer's recovery from a failed delete is the message coming
    # back and being judged a duplicate: within the test, not 30 s later.
    with running_sqs_queue(visibility_timeout=VISIBILITY_TIMEOUT_SECONDS) as queue:
        yield queue


def stage_event(
    stage_arn: str,
    name: str,
    participant_id: str,
    when: datetime,
    event_id: str | None = None,
    **detail: str,
) -> str:
    return json.dumps(
        {
            "version": "0",
            "id": event_id or str(uuid.uuid4()),
            "detail-type": "IVS Stage Update",
            "source": "aws.ivs",
            "account": "123456789012",
            "time": when.isoformat(),
            "region": "us-east-1",
            "resources": [stage_arn],
            "detail": {
                "session_id": "st-0123456789abc",
                "event_name": name,
                "event_time": when.isoformat(),
                "participant_id": participant_id,
                "user_id": "",
                **detail,
            },
        }
    )


async def test_publish_events_from_sqs_refresh_the_stage_at_once(
    tmp_path: Path, sqs_queue: LocalSqsQueue
) -> None:
    send = sqs_queue.send

    async with (
        running_system(tmp_path, FANOUT_PUBLISHER_GRACE_SECONDS="1") as system,
        aiohttp.ClientSession() as http,
    ):
        (token,) = await start_show(http, system)
        arn = token["stageArn"]
        async with running_monitor(
            system,
            **reading_events_from(sqs_queue),
        ) as monitor:

            def events(event: str, outcome: str) -> float:
                return monitor.metric("fanout_monitor_events_total", event=event, outcome=outcome) or 0

            assert await stage_states(system) == [STANDBY]
            publisher = system.ivs.state.connect_participant(token["token"])
            system.ivs.state.set_published(arn, publisher.participant_id, True)
            published_at = datetime.now(UTC)
            published = stage_event(
                arn, "Participant Published", publisher.participant_id, published_at, "e1"
            )
            await send(published)
            await eventually(
                lambda: _states_are(system, [LIVE]),
                what="LIVE through the event path",
                within=EVENT_WITHIN_SECONDS,
            )

            await send(published)  # delivered twice
            await send(  # arrives after the Published it preceded
                stage_event(
                    arn,
                    "Participant Unpublished",
                    publisher.participant_id,
                    published_at - timedelta(seconds=3),
                )
            )
            await send("{not an event")
            await send(
                stage_event(
                    "arn:aws:ivs:us-east-1:123456789012:stage/otherCluster1",
                    "Participant Published",
                    "someone",
                    published_at,
                )
            )
            await eventually(
                lambda: (
                    (
                        events("participant_published", "duplicate"),
                        events("participant_unpublished", "stale"),
                        events("unknown", "malformed"),
                        events("participant_published", "ignored"),
                    )
                    == (1, 1, 1, 1)
                ),
                what="every message judged",
            )
            assert events("participant_published", "handled") == 1
            assert await stage_states(system) == [LIVE]

            # A real Unpublished, past the stage manager's grace: the Stage goes back to STANDBY.
            await asyncio.sleep(1.1)
            system.ivs.state.disconnect(arn, publisher.participant_id)
            await send(
                stage_event(arn, "Participant Unpublished", publisher.participant_id, datetime.now(UTC))
            )
            await eventually(lambda: _states_are(system, [STANDBY]), what="STANDBY through the event path")
            assert events("participant_unpublished", "handled") == 1

            async def queue_empty() -> bool:
                attributes = (
                    await asyncio.to_thread(
                        sqs_queue.client.get_queue_attributes,
                        QueueUrl=sqs_queue.url,
                        AttributeNames=[
                            "ApproximateNumberOfMessages",
                            "ApproximateNumberOfMessagesNotVisible",
                        ],
                    )
                )["Attributes"]
                return attributes == {
                    "ApproximateNumberOfMessages": "0",
                    "ApproximateNumberOfMessagesNotVisible": "0",
                }

            await eventually(
                queue_empty,
                what="every message deleted, the malformed one included",
                within=VISIBILITY_TIMEOUT_SECONDS + 10,
            )
            assert (monitor.metric("fanout_monitor_cycle_seconds_count") or 0) == 1


async def test_replication_events_from_sqs_check_the_destination_stage_at_once(
    tmp_path: Path, sqs_queue: LocalSqsQueue
) -> None:
    send = sqs_queue.send

    async with (
        running_system(tmp_path, FANOUT_MIN_STAGES="2", FANOUT_PUBLISHER_GRACE_SECONDS="1") as system,
        aiohttp.ClientSession() as http,
    ):
        token, other = await start_show(http, system)
        source, destination = token["stageArn"], other["stageArn"]
        publisher = system.ivs.state.connect_participant(token["token"])
        system.ivs.state.set_published(source, publisher.participant_id, True)
        destination_id = destination.rsplit("/", 1)[1]

        async with running_monitor(
            system,
            **reading_events_from(sqs_queue),
        ) as monitor:

            def events(event: str, outcome: str) -> float:
                return monitor.metric("fanout_monitor_events_total", event=event, outcome=outcome) or 0

            def destination_publishers() -> float | None:
                return monitor.metric(
                    "fanout_monitor_observed_participants",
                    room="main",
                    stage=destination_id,
                    role="publisher",
                )

            await eventually(lambda: _states_are(system, [LIVE, STANDBY]), what="the first pass")
            assert destination_publishers() == 0

            # IVS copies the publisher into the other Stage; the event names the source in resources.
            system.ivs.state.start_participant_replication(source, destination, publisher.participant_id)
            started_at = datetime.now(UTC)
            await send(
                stage_event(
                    source,
                    "Participant Replication Started",
                    publisher.participant_id,
                    started_at,
                    destination_stage_arn=destination,
                )
            )
            await eventually(
                lambda: _states_are(system, [LIVE, LIVE]),
                what="the replica seen at once",
                within=EVENT_WITHIN_SECONDS,
            )
            assert destination_publishers() == 1

            # Past the stage manager's grace, the replication stops: the replica leaves the destination.
            await asyncio.sleep(1.1)
            system.ivs.state.stop_participant_replication(source, destination, publisher.participant_id)
            stopped = stage_event(
                source,
                "Participant Replication Stopped",
                publisher.participant_id,
                datetime.now(UTC),
                "replication-stopped-1",
                source_stage_arn=source,
                destination_stage_arn=destination,
            )
            await send(stopped)
            await eventually(
                lambda: _states_are(system, [LIVE, STANDBY]),
                what="the destination back to STANDBY through the event path",
                within=EVENT_WITHIN_SECONDS,
            )
            assert destination_publishers() == 0
            assert events("participant_replication_started", "handled") == 1
            assert events("participant_replication_stopped", "handled") == 1

            await send(stopped)  # delivered twice
            await send(  # overtaken by the Stopped of the same replication
                stage_event(
                    source,
                    "Participant Replication Started",
                    publisher.participant_id,
                    started_at - timedelta(seconds=3),
                    destination_stage_arn=destination,
                )
            )
            malformed = json.loads(stopped)
            malformed["id"] = "replication-stopped-2"
            malformed["detail"]["event_time"] = "yesterday"
            await send(json.dumps(malformed))
            await eventually(
                lambda: (
                    (
                        events("participant_replication_stopped", "duplicate"),
                        events("participant_replication_started", "stale"),
                        events("unknown", "malformed"),
                    )
                    == (1, 1, 1)
                ),
                what="every message judged",
            )
            assert events("participant_replication_stopped", "handled") == 1
            assert events("participant_replication_started", "handled") == 1
            assert await stage_states(system) == [LIVE, STANDBY]
            assert (monitor.metric("fanout_monitor_cycle_seconds_count") or 0) == 1


async def test_with_the_queue_gone_the_monitor_polls_on_and_reads_events_again_when_it_is_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="services.monitor.consumer")
    port = free_port()
    name = new_queue_name()

    def consumer_logs(level: int) -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == "services.monitor.consumer" and r.levelno == level
        ]

    async with (
        contextlib.AsyncExitStack() as sqs,
        running_system(tmp_path) as system,
        aiohttp.ClientSession() as http,
    ):
        queue = sqs.enter_context(running_sqs_queue(port, name))
        (token,) = await start_show(http, system)
        arn = token["stageArn"]
        async with running_monitor(
            system,
            **reading_events_from(queue),
        ) as monitor:
            assert await stage_states(system) == [STANDBY]
            await sqs.aclose()  # SQS vanishes: its port refuses connections
            await eventually(lambda: consumer_logs(logging.WARNING), what="the outage logged")
            assert await monitor.serving(), "the queue is an accelerator: the monitor serves without it"
            warning = consumer_logs(logging.WARNING)[0]
            assert "polling goes on alone" in warning
            assert queue.url not in warning and "Traceback" not in caplog.text

            # SQS is back with the same queue; the next event reaches the Stage without a polling pass.
            with running_sqs_queue(port, name) as back:
                publisher = system.ivs.state.connect_participant(token["token"])
                system.ivs.state.set_published(arn, publisher.participant_id, True)
                await back.send(
                    stage_event(arn, "Participant Published", publisher.participant_id, datetime.now(UTC))
                )
                await eventually(
                    lambda: _states_are(system, [LIVE]),
                    what="LIVE through the event path once SQS is back",
                    within=EVENT_WITHIN_SECONDS + MAX_BACKOFF_SECONDS,
                )
                assert any("again" in line for line in consumer_logs(logging.INFO))
                assert len(consumer_logs(logging.WARNING)) == 1, "the outage is logged once"
                assert (monitor.metric("fanout_monitor_cycle_seconds_count") or 0) == 1
