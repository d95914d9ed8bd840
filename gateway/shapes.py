"""Protobuf messages shaped as the public JSON of DESIGN.md §7."""

from __future__ import annotations

from datetime import UTC
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from protos.fanout.v1 import common_pb2

_STATE_PREFIX = "STAGE_STATE_"


def participant_token_json(token: common_pb2.ParticipantToken) -> dict[str, Any]:
    return {
        "stageArn": token.stage_arn,
        "token": token.token,
        "participantId": token.participant_id,
        "expirationTime": iso_utc(token.expiration_time) if token.HasField("expiration_time") else None,
    }


def iso_utc(timestamp: Timestamp) -> str:
    return timestamp.ToDatetime(tzinfo=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def state_name(state: int) -> str:
    try:
        name = common_pb2.StageState.Name(state)  # type: ignore[arg-type]
    except ValueError:
        # A state added to the proto after this gateway was built.
        return "UNKNOWN"
    return name.removeprefix(_STATE_PREFIX)
