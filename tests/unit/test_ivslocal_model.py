"""The emulator core without sockets: session end delay, call-rate buckets, page tokens."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.ivslocal.config import Settings
from services.ivslocal.errors import ServiceQuotaExceededError, ValidationError
from services.ivslocal.model import IvsState, TokenRequest
from services.ivslocal.ratelimit import RateLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def test_session_ends_only_after_the_configured_delay() -> None:
    clock = FakeClock()
    state = IvsState(Settings(session_end_delay_seconds=120), clock=clock)
    stage, _ = state.create_stage()
    token = state.create_participant_token(stage.arn, TokenRequest(capabilities=["SUBSCRIBE"])).token
    participant = state.connect_participant(token)
    state.disconnect(stage.arn, participant.participant_id)

    clock.advance(119)
    assert state.get_stage(stage.arn).active_session_id == participant.session_id

    # Rejoining within the delay keeps the session.
    assert state.connect_participant(token).session_id == participant.session_id
    state.disconnect(stage.arn, participant.participant_id)
    left_at = clock.now
    clock.advance(121)
    assert state.get_stage(stage.arn).active_session_id is None
    session = state.get_stage_session(stage.arn, participant.session_id)
    assert session.end_time == left_at + timedelta(seconds=120)


def test_rate_limiter_refills_per_operation() -> None:
    now = [0.0]
    limiter = RateLimiter({"GetStage": 5.0, "ImportPublicKey": 3.0}, clock=lambda: now[0])
    assert [limiter.allow("GetStage") for _ in range(6)] == [True] * 5 + [False]
    assert limiter.allow("ImportPublicKey")
    now[0] += 0.2
    assert limiter.allow("GetStage")
    assert not limiter.allow("GetStage")
    assert limiter.allow("SomethingUnlisted")


@pytest.mark.parametrize("token", ["!!!", "aGVsbG8=", "aXZzbG9jYWw6eA=="])
def test_foreign_page_tokens_are_rejected(token: str) -> None:
    state = IvsState(Settings())
    with pytest.raises(ValidationError):
        state.list_stages(next_token=token)


def test_a_replication_stops_exactly_when_its_reconnect_window_runs_out() -> None:
    clock = FakeClock()
    state = IvsState(Settings(), clock=clock)
    source, _ = state.create_stage()
    destination, _ = state.create_stage()
    token = state.create_participant_token(source.arn, TokenRequest(capabilities=["PUBLISH"])).token
    publisher = state.connect_participant(token)
    state.set_published(source.arn, publisher.participant_id, True)
    replication = state.start_participant_replication(
        source.arn, destination.arn, publisher.participant_id, reconnect_window_seconds=30
    )

    state.set_published(source.arn, publisher.participant_id, False)
    clock.advance(29)
    assert replication.state == "ACTIVE" and not replication.replica.publishing
    # Back within the window: the replica publishes again and a later drop starts a new window.
    state.set_published(source.arn, publisher.participant_id, True)
    assert replication.replica.publishing
    clock.advance(60)
    state.set_published(source.arn, publisher.participant_id, False)
    dropped_at = clock.now
    clock.advance(30)
    state.settle()
    assert replication.state == "STOPPED"
    assert replication.replica.state == "DISCONNECTED"
    events = state.list_participant_events(source.arn, publisher.session_id, publisher.participant_id).items
    assert events[-1].name == "REPLICATION_STOPPED"
    assert events[-1].event_time == dropped_at + timedelta(seconds=30)


def test_the_sixth_concurrent_replication_of_a_participant_is_refused() -> None:
    state = IvsState(Settings())
    token_request = TokenRequest(capabilities=["PUBLISH"])
    first, _ = state.create_stage()
    publisher = state.connect_participant(state.create_participant_token(first.arn, token_request).token)
    state.set_published(first.arn, publisher.participant_id, True)
    destinations = [state.create_stage()[0] for _ in range(6)]
    for destination in destinations[:5]:
        state.start_participant_replication(first.arn, destination.arn, publisher.participant_id)
    with pytest.raises(ServiceQuotaExceededError):
        state.start_participant_replication(first.arn, destinations[5].arn, publisher.participant_id)
