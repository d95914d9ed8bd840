"""The emulator's `IVS Stage Update` events on a real SQS API (moto's server), as EventBridge → SQS
delivers IVS's, read by the monitor's own parser and consumer."""

from __future__ import annotations

import asyncio
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

from protos.fanout.v1 import common_pb2
from services.ivslocal.config import Settings
from services.monitor.events import parse_event
from tests.integration.ivs_publisher import EmulatorPublisher
from tests.integration.ivslocal_fixtures import AsyncIvsClient, running_ivslocal
from tests.integration.monitor_fixtures import (
    LocalSqsQueue,
    new_queue_name,
    reading_events_from,
    running_monitor,
    running_sqs_queue,
)
from tests.integration.system import running_system
from tests.integration.test_monitor import stage_states, start_show
from tests.integration.waiting import eventually
from tests.ports import free_port

LIVE, STANDBY = common_pb2.STAGE_STATE_LIVE, common_pb2.STAGE_STATE_STANDBY
ENVELOPE = {"version", "id", "detail-type", "source", "account", "time", "region", "resources", "detail"}
DETAIL = {"session_id", "event_name", "event_time", "participant_id", "user_id"}
REPLICATION_DETAIL = {
    "source_stage_arn",
    "source_session_id",
    "destination_stage_arn",
    "destination_session_id",
}


@pytest.fixture
def sqs() -> Iterator[LocalSqsQueue]:
    with running_sqs_queue() as queue:
        yield queue


def emulator_settings(endpoint: str, queue_url: str) -> Settings:
    return Settings(port=0, events_sqs_queue_url=queue_url, events_sqs_endpoint=endpoint)


async def received(queue: LocalSqsQueue, count: int, within: float = 10.0) -> list[dict[str, Any]]:
    """Reads (and deletes) messages until `count` have come; returns every event read, in arrival order."""
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + within
    while len(events) < count:
        assert time.monotonic() < deadline, f"{len(events)} of {count} events came: {events}"
        response = await asyncio.to_thread(
            queue.client.receive_message, QueueUrl=queue.url, MaxNumberOfMessages=10, WaitTimeSeconds=1
        )
        for message in response.get("Messages", []):
            events.append(json.loads(message["Body"]))
            await asyncio.to_thread(
                queue.client.delete_message, QueueUrl=queue.url, ReceiptHandle=message["ReceiptHandle"]
            )
    return events


async def publish_token(ivs: AsyncIvsClient, stage_arn: str) -> dict[str, Any]:
    response = await ivs.create_participant_token(
        stageArn=stage_arn, userId="broadcaster", capabilities=["PUBLISH", "SUBSCRIBE"]
    )
    return dict(response["participantToken"])


def replication(source: str, destination: str, participant_id: str) -> dict[str, str]:
    """StartParticipantReplication's and StopParticipantReplication's arguments."""
    return {"sourceStageArn": source, "destinationStageArn": destination, "participantId": participant_id}


async def active_session(ivs: AsyncIvsClient, stage_arn: str) -> str:
    return str((await ivs.get_stage(arn=stage_arn))["stage"]["activeSessionId"])


def assert_envelope(event: dict[str, Any], stage_arn: str, name: str, since: datetime) -> None:
    assert set(event) == ENVELOPE
    uuid.UUID(event["id"])
    assert (event["version"], event["detail-type"], event["source"]) == ("0", "IVS Stage Update", "aws.ivs")
    assert (event["account"], event["region"], event["resources"]) == (
        "123456789012",
        "us-east-1",
        [stage_arn],
    )
    assert event["detail"]["event_name"] == name
    assert event["time"].endswith("Z") and event["detail"]["event_time"].endswith("Z")
    now = datetime.now(UTC)
    assert since - timedelta(seconds=1) <= datetime.fromisoformat(event["time"]) <= now
    assert since <= datetime.fromisoformat(event["detail"]["event_time"]) <= now


async def test_publishing_and_replication_reach_the_queue_as_ivs_stage_update_events(
    sqs: LocalSqsQueue,
) -> None:
    since = datetime.now(UTC)
    async with running_ivslocal(emulator_settings(sqs.endpoint, sqs.url)) as server:
        ivs = server.client()
        source = (await ivs.create_stage(name="source"))["stage"]["arn"]
        destination = (await ivs.create_stage(name="destination"))["stage"]["arn"]
        publisher = await EmulatorPublisher(await publish_token(ivs, source)).publish()
        participant_id = publisher.participant_id
        source_session = await active_session(ivs, source)
        try:
            (published,) = await received(sqs, 1)
            assert_envelope(published, source, "Participant Published", since)
            assert published["detail"] == {
                "session_id": source_session,
                "event_name": "Participant Published",
                "event_time": published["detail"]["event_time"],
                "participant_id": participant_id,
                "user_id": "broadcaster",
            }
            # The event's time is the one IVS records for the participant.
            (publish_started,) = [
                e
                for e in (
                    await ivs.list_participant_events(
                        stageArn=source, sessionId=source_session, participantId=participant_id
                    )
                )["events"]
                if e["name"] == "PUBLISH_STARTED"
            ]
            event_time = datetime.fromisoformat(published["detail"]["event_time"])
            assert abs(event_time - publish_started["eventTime"]) < timedelta(milliseconds=1)
            parsed = parse_event(json.dumps(published))
            assert (parsed.id, parsed.stage_arn, parsed.participant_id, parsed.session_id) == (
                published["id"],
                source,
                participant_id,
                source_session,
            )
            assert parsed.about_publishing and parsed.event_time == event_time

            await ivs.start_participant_replication(**replication(source, destination, participant_id))
            destination_session = await active_session(ivs, destination)
            # The replica publishing in the destination is told by this event alone (no Published).
            (started,) = await received(sqs, 1)
            await ivs.stop_participant_replication(**replication(source, destination, participant_id))
            (stopped,) = await received(sqs, 1)
            for event, name in (
                (started, "Participant Replication Started"),
                (stopped, "Participant Replication Stopped"),
            ):
                assert_envelope(event, source, name, since)
                assert set(event["detail"]) == DETAIL | REPLICATION_DETAIL
                assert event["detail"] == {
                    **event["detail"],
                    "session_id": source_session,
                    "participant_id": participant_id,
                    "user_id": "broadcaster",
                    "source_stage_arn": source,
                    "source_session_id": source_session,
                    "destination_stage_arn": destination,
                    "destination_session_id": destination_session,
                }
                parsed = parse_event(json.dumps(event))
                assert parsed.event_name == name and parsed.about_publishing
                assert parsed.stage_arns == (source, destination)
                assert parsed.order_key == ("replication", participant_id, *sorted((source, destination)))
            assert parse_event(json.dumps(started)).event_time <= parse_event(json.dumps(stopped)).event_time
        finally:
            await publisher.leave()

        (unpublished,) = await received(sqs, 1)
        assert_envelope(unpublished, source, "Participant Unpublished", since)
        assert set(unpublished["detail"]) == DETAIL
        assert parse_event(json.dumps(unpublished)).participant_id == participant_id
        # Joins and leaves are not EventBridge events (ivs-facts §4): nothing else came.
        await asyncio.sleep(0.5)
        response = await asyncio.to_thread(sqs.client.receive_message, QueueUrl=sqs.url, WaitTimeSeconds=1)
        assert response.get("Messages", []) == []
        assert len({e["id"] for e in (published, started, stopped, unpublished)}) == 4


async def test_the_monitor_checks_the_destination_at_once_on_the_emulators_replication_stopped(
    tmp_path: Path, sqs: LocalSqsQueue
) -> None:
    async with (
        running_system(
            tmp_path,
            ivs_settings=emulator_settings(sqs.endpoint, sqs.url),
            FANOUT_MIN_STAGES="2",
            FANOUT_PUBLISHER_GRACE_SECONDS="1",
        ) as system,
        aiohttp.ClientSession() as http,
    ):
        token, other = await start_show(http, system)
        source, destination = token["stageArn"], other["stageArn"]
        ivs = system.ivs.client()
        async with running_monitor(
            system,
            **reading_events_from(sqs),
        ) as monitor:

            def handled(event: str) -> float:
                return monitor.metric("fanout_monitor_events_total", event=event, outcome="handled") or 0

            async def states_are(states: list[int]) -> bool:
                return await stage_states(system) == states

            assert await stage_states(system) == [STANDBY, STANDBY]
            publisher = await EmulatorPublisher(token).publish()
            try:
                await eventually(
                    lambda: states_are([LIVE, STANDBY]), what="LIVE on the emulator's Published", within=5
                )
                await ivs.start_participant_replication(
                    **replication(source, destination, publisher.participant_id)
                )
                await eventually(
                    lambda: states_are([LIVE, LIVE]), what="the replica seen on its Started", within=5
                )
                # Past the stage manager's grace, so a publisher gone from the destination counts at once.
                await asyncio.sleep(1.1)
                await ivs.stop_participant_replication(
                    **replication(source, destination, publisher.participant_id)
                )
                stopped_at = time.monotonic()
                await eventually(
                    lambda: states_are([LIVE, STANDBY]),
                    what="the destination back to STANDBY on the emulator's Replication Stopped",
                    within=5,
                )
                reacted_in = time.monotonic() - stopped_at
            finally:
                await publisher.leave()
            assert (
                handled("participant_published"),
                handled("participant_replication_started"),
                handled("participant_replication_stopped"),
            ) == (1, 1, 1)
            # No second polling pass: the events alone did it.
            assert (monitor.metric("fanout_monitor_cycle_seconds_count") or 0) == 1
        print(f"\nthe destination went STANDBY {reacted_in:.2f} s after StopParticipantReplication")
        assert reacted_in < 3


async def test_with_sqs_unanswering_the_emulators_calls_stay_prompt() -> None:
    with socket.socket() as silent:
        # Connections complete into the backlog and are never answered: every send hangs till its timeout.
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        settings = emulator_settings(endpoint, f"{endpoint}/123456789012/ivs-stage-events")
        async with running_ivslocal(settings) as server:
            ivs = server.client(retries=False)
            source = (await ivs.create_stage(name="source"))["stage"]["arn"]
            destination = (await ivs.create_stage(name="destination"))["stage"]["arn"]
            publisher = await EmulatorPublisher(await publish_token(ivs, source)).publish()
            try:
                arguments = replication(source, destination, publisher.participant_id)
                calls = {
                    "StartParticipantReplication": lambda: ivs.start_participant_replication(**arguments),
                    "StopParticipantReplication": lambda: ivs.stop_participant_replication(**arguments),
                    "GetStage": lambda: ivs.get_stage(arn=source),
                }
                for name, call in calls.items():
                    started = time.monotonic()
                    await call()
                    assert time.monotonic() - started < 1.0, f"{name} waited on SQS"
            finally:
                await publisher.leave()
            stopping = time.monotonic()
        assert time.monotonic() - stopping < 3.0, "the emulator's shutdown waited on SQS"


async def test_an_sqs_outage_is_logged_once_and_its_events_follow_when_sqs_is_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="services.ivslocal.eventbridge")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    queue_name = new_queue_name()
    settings = emulator_settings(endpoint, f"{endpoint}/123456789012/{queue_name}")
    async with running_ivslocal(settings) as server:
        ivs = server.client(retries=False)
        source = (await ivs.create_stage(name="source"))["stage"]["arn"]
        destination = (await ivs.create_stage(name="destination"))["stage"]["arn"]
        publisher = await EmulatorPublisher(await publish_token(ivs, source)).publish()
        try:
            for _ in range(3):
                await ivs.start_participant_replication(
                    **replication(source, destination, publisher.participant_id)
                )
                await ivs.stop_participant_replication(
                    **replication(source, destination, publisher.participant_id)
                )

            def outage_warnings() -> list[logging.LogRecord]:
                return [
                    r
                    for r in caplog.records
                    if r.name == "services.ivslocal.eventbridge" and r.levelno >= logging.WARNING
                ]

            await eventually(outage_warnings, what="the outage logged")
            await asyncio.sleep(1.0)  # a few retries later

            with running_sqs_queue(port, queue_name) as sqs:
                assert sqs.url == settings.events_sqs_queue_url
                events = await received(sqs, 7)
                await eventually(
                    lambda: any(
                        "again" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO
                    ),
                    what="the end of the outage logged",
                )
                assert len(outage_warnings()) == 1, [r.getMessage() for r in outage_warnings()]
        finally:
            await publisher.leave()

    names = [e["detail"]["event_name"] for e in events]
    assert sorted(names) == sorted(
        ["Participant Published"] + ["Participant Replication Started", "Participant Replication Stopped"] * 3
    )
    assert all(parse_event(json.dumps(e)).about_publishing for e in events)
