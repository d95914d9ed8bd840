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


def event_body(
    event_id: str, name: str = "Participant Published", when: str = "2024-05-01T10:00:00Z", **detail: object
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
            "resources": [STAGE],
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
