"""The emulator core without sockets: session end delay, call-rate buckets, page tokens."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.ivslocal.config import Settings
from services.ivslocal.errors import ValidationError
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
