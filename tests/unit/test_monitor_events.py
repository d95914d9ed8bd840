"""IVS Stage Update events: de-duplicated by id, ordered per participant, malformed ones dropped."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from prometheus_client import CollectorRegistry

from services.monitor.consumer import EventConsumer
from services.monitor.events import EventGate, MalformedEvent, parse_event
from services.monitor.metrics import MonitorMetrics
from services.monitor.sqs import QueueMessage

STAGE = "arn:aws:ivs:us-east-1:123456789012:stage/abcdABCDefgh"
REPLICA_STAGE = "arn:aws:ivs:us-east-1:123456789012:stage/replicaStage1"


def event_body(
    event_id: str,
    name: str = "Participant Published",
    when: str = "2024-05-01T10:00:00Z",
    stage: str = STAGE,
    **detail: object,
) -> str:
    return json.dumps(
        {
            "version": "0",
            "id": event_id,
            "detail-type": "IVS Stage Update",
            "source": "aws.ivs",
            "account": "123456789012",
            "time": when,
            "region": "us-east-1",
            "resources": [stage],
            "detail": {
                "session_id": "st-0123456789abc",
                "event_name": name,
                "event_time": when,
                "participant_id": "p1",
                "user_id": "",
                **detail,
            },
        }
    )


def test_parse_reads_the_fields_that_matter() -> None:
    event = parse_event(event_body("e1", when="2024-05-01T10:00:00.250Z"))
    assert (event.id, event.stage_arn, event.participant_id, event.label) == (
        "e1",
        STAGE,
        "p1",
        "participant_published",
    )
    assert event.event_time == datetime(2024, 5, 1, 10, 0, 0, 250_000, tzinfo=UTC)
    assert event.about_publishing


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "[]",
        json.dumps({"detail-type": "IVS Stage Update", "detail": {}}),
        event_body("e1", when="yesterday"),
        event_body("e1", participant_id=""),
        json.dumps({"id": "e1", "detail-type": "IVS Stage Update", "detail": {"event_name": "x"}}),
    ],
)
def test_malformed_messages_are_recognised(body: str) -> None:
    with pytest.raises(MalformedEvent):
        parse_event(body)


def test_other_events_parse_but_are_not_about_publishing() -> None:
    assert not parse_event(event_body("e1", name="Participant Publish Error")).about_publishing
    other_type = json.dumps({"id": "e2", "detail-type": "IVS Composition State Change", "detail": {}})
    assert not parse_event(other_type).about_publishing


def test_the_gate_drops_duplicates_and_events_older_than_the_participants_latest() -> None:
    gate = EventGate()
    published = parse_event(event_body("e1", "Participant Published", "2024-05-01T10:00:05Z"))
    late_unpublished = parse_event(event_body("e0", "Participant Unpublished", "2024-05-01T10:00:01Z"))
    other_participant = parse_event(
        event_body("e3", "Participant Unpublished", "2024-05-01T10:00:01Z", participant_id="p2")
    )
    newer_unpublished = parse_event(event_body("e4", "Participant Unpublished", "2024-05-01T10:00:09Z"))
    assert gate.admit(published) == "handled"
    assert gate.admit(published) == "duplicate"
    assert gate.admit(late_unpublished) == "stale"
    assert gate.admit(other_participant) == "handled"
    assert gate.admit(newer_unpublished) == "handled"
    assert gate.admit(late_unpublished) == "duplicate"


def test_the_gate_forgets_the_oldest_ids_first() -> None:
    gate = EventGate(max_ids=2)
    for i in range(3):
        assert gate.admit(parse_event(event_body(f"e{i}", when=f"2024-05-01T10:00:0{i}Z"))) == "handled"
    # e0 was forgotten, but it is older than p1's latest event, so it still does nothing.
    assert gate.admit(parse_event(event_body("e0", when="2024-05-01T10:00:00Z"))) == "stale"


class FakeQueue:
    def __init__(self) -> None:
        self.deleted: list[str] = []

    async def receive(self) -> list[QueueMessage]:
        return []

    async def delete(self, receipt_handles: list[str]) -> int:
        self.deleted.extend(receipt_handles)
        return 0


class Checks:
    def __init__(self, known: set[str]) -> None:
        self.known = known
        self.requested: list[str] = []

    def request_publisher_check(self, stage_arn: str) -> bool:
        if stage_arn not in self.known:
            return False
        self.requested.append(stage_arn)
        return True


async def test_the_consumer_counts_every_outcome_and_deletes_every_message() -> None:
    registry = CollectorRegistry()
    queue = FakeQueue()
    checks = Checks({STAGE})
    consumer = EventConsumer(queue, checks, MonitorMetrics(registry, stage_quota=1000))
    foreign = json.loads(event_body("e9"))
    foreign["resources"] = ["arn:aws:ivs:us-east-1:123456789012:stage/otherCluster"]
    bodies = [
        event_body("e1", "Participant Published", "2024-05-01T10:00:05Z"),
        event_body("e1", "Participant Published", "2024-05-01T10:00:05Z"),
        event_body("e0", "Participant Unpublished", "2024-05-01T10:00:01Z"),
        "{broken",
        json.dumps(foreign),
        event_body("e5", "Token Exchanged"),
    ]
    await consumer.handle([QueueMessage(f"r{i}", body) for i, body in enumerate(bodies)])

    assert checks.requested == [STAGE]
    assert queue.deleted == [f"r{i}" for i in range(len(bodies))]

    def count(event: str, outcome: str) -> float | None:
        return registry.get_sample_value("fanout_monitor_events_total", {"event": event, "outcome": outcome})

    assert count("participant_published", "handled") == 1
    assert count("participant_published", "duplicate") == 1
    assert count("participant_unpublished", "stale") == 1
    assert count("unknown", "malformed") == 1
    assert count("participant_published", "ignored") == 1
    assert count("other", "ignored") == 1


STARTED, STOPPED = "Participant Replication Started", "Participant Replication Stopped"


def test_a_replication_event_names_both_ends_whichever_one_resources_names() -> None:
    from_source = parse_event(event_body("e1", STARTED, destination_stage_arn=REPLICA_STAGE))
    from_destination = parse_event(
        event_body(
            "e2", STOPPED, stage=REPLICA_STAGE, source_stage_arn=STAGE, destination_stage_arn=REPLICA_STAGE
        )
    )
    assert from_source.stage_arns == (STAGE, REPLICA_STAGE)
    assert from_destination.stage_arns == (REPLICA_STAGE, STAGE)
    assert (from_source.label, from_destination.label) == (
        "participant_replication_started",
        "participant_replication_stopped",
    )
    assert from_source.about_publishing and from_destination.about_publishing
    # Only replication events name another Stage; a Published event is about its own Stage alone.
    assert parse_event(event_body("e3", destination_stage_arn=REPLICA_STAGE)).stage_arns == (STAGE,)


@pytest.mark.parametrize(
    "other_end",
    [
        {"destination_stage_arn": 12},
        {"destination_stage_arn": "stage/replicaStage1"},
        {"destination_stage_arn": "arn:aws:ivs:us-east-1:123456789012:channel/abc"},
        {"destination_stage_arn": REPLICA_STAGE + "\nX"},
        {"source_stage_arn": ["arn:aws:ivs:us-east-1:123456789012:stage/replicaStage1"]},
        {"destination_stage_arn": None},
        {},
    ],
)
def test_a_replication_event_with_no_readable_other_end_still_names_its_resource(
    other_end: dict[str, object],
) -> None:
    event = parse_event(event_body("e1", STOPPED, **other_end))
    assert event.stage_arns == (STAGE,)
    assert event.about_publishing


@pytest.mark.parametrize(
    "body",
    [
        event_body("e1", STOPPED, when="yesterday", destination_stage_arn=REPLICA_STAGE),
        event_body("e1", STOPPED, participant_id=7, destination_stage_arn=REPLICA_STAGE),
        json.dumps(
            {
                "id": "e1",
                "detail-type": "IVS Stage Update",
                "resources": [],
                "detail": {
                    "event_name": STOPPED,
                    "event_time": "2024-05-01T10:00:00Z",
                    "destination_stage_arn": REPLICA_STAGE,
                },
            }
        ),
    ],
)
def test_malformed_replication_events_are_recognised(body: str) -> None:
    with pytest.raises(MalformedEvent):
        parse_event(body)


def test_replication_events_are_ordered_per_replication_never_against_publishing() -> None:
    gate = EventGate()

    def admit(event_id: str, name: str, when: str, stage: str = STAGE, **detail: object) -> str:
        return gate.admit(
            parse_event(event_body(event_id, name, f"2024-05-01T10:00:{when}Z", stage, **detail))
        )

    assert admit("e1", "Participant Published", "10") == "handled"
    # Should IVS report the replica as published on the destination (same participant id), later on.
    assert admit("e2", "Participant Published", "11", REPLICA_STAGE) == "handled"
    # Older than both Published events of the participant, yet news for the destination's publishers.
    assert admit("e3", STARTED, "05", destination_stage_arn=REPLICA_STAGE) == "handled"
    # The same replication, told from its destination's side.
    assert admit("e4", STOPPED, "09", REPLICA_STAGE, source_stage_arn=STAGE) == "handled"
    assert admit("e4", STOPPED, "09", REPLICA_STAGE, source_stage_arn=STAGE) == "duplicate"
    # A Started that was overtaken by the Stopped of the same replication says nothing new.
    assert admit("e5", STARTED, "07", destination_stage_arn=REPLICA_STAGE) == "stale"
    # Another participant's replication between the same Stages is its own story.
    assert admit("e6", STARTED, "01", participant_id="p2", destination_stage_arn=REPLICA_STAGE) == "handled"
    # Without its other end it could be any of the participant's replications: never called stale.
    assert admit("e7", STARTED, "01") == "handled"
    # Replication events do not make a late Unpublished look new, nor an old one look stale.
    assert admit("e8", "Participant Unpublished", "08") == "stale"
    assert admit("e9", "Participant Unpublished", "12") == "handled"


async def test_a_replication_event_checks_every_watched_stage_it_names() -> None:
    registry = CollectorRegistry()
    queue = FakeQueue()
    checks = Checks({REPLICA_STAGE})
    consumer = EventConsumer(queue, checks, MonitorMetrics(registry, stage_quota=1000))
    stopped = event_body("e1", STOPPED, "2024-05-01T10:00:05Z", destination_stage_arn=REPLICA_STAGE)
    bodies = [
        stopped,
        stopped,
        event_body("e2", STARTED, "2024-05-01T10:00:01Z", destination_stage_arn=REPLICA_STAGE),
        # Names only a Stage of another cluster: nothing to check.
        event_body("e3", STARTED, "2024-05-01T10:00:06Z", destination_stage_arn="not-a-stage"),
        event_body("e4", STOPPED, "yesterday", destination_stage_arn=REPLICA_STAGE),
        event_body("e5", STOPPED, "2024-05-01T10:00:07Z", REPLICA_STAGE, source_stage_arn=STAGE),
    ]
    await consumer.handle([QueueMessage(f"r{i}", body) for i, body in enumerate(bodies)])

    # The source Stage is not watched here; the destination is checked, from either side's event.
    assert checks.requested == [REPLICA_STAGE, REPLICA_STAGE]
    assert queue.deleted == [f"r{i}" for i in range(len(bodies))]

    def count(event: str, outcome: str) -> float | None:
        return registry.get_sample_value("fanout_monitor_events_total", {"event": event, "outcome": outcome})

    assert count("participant_replication_stopped", "handled") == 2
    assert count("participant_replication_stopped", "duplicate") == 1
    assert count("participant_replication_started", "stale") == 1
    assert count("participant_replication_started", "ignored") == 1
    assert count("unknown", "malformed") == 1
