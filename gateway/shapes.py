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


_ROLES = {common_pb2.STAGE_ROLE_ORIGIN: "origin", common_pb2.STAGE_ROLE_REPLICA: "replica"}
_REPLICATION_PREFIX = "REPLICATION_STATE_"


def stage_json(stage: common_pb2.Stage, occupancy: Any | None) -> dict[str, Any]:
    """One Stage of `GET /api/rooms/{room}`: its place in the topology, its feed, its audience."""
    role = _ROLES.get(stage.role, "origin")
    shape: dict[str, Any] = {
        "stageArn": stage.arn or None,
        "index": stage.index,
        "role": role,
        "state": state_name(stage.state),
        "viewers": occupancy.viewers if occupancy is not None else 0,
        "capacity": occupancy.capacity if occupancy is not None else 0,
    }
    if role == "replica":
        try:
            replication = common_pb2.ReplicationState.Name(stage.replication)
        except ValueError:
            replication = "UNKNOWN"
        shape["originIndex"] = stage.origin_index
        shape["replication"] = replication.removeprefix(_REPLICATION_PREFIX)
        shape["replicationError"] = stage.replication_error or None
    return shape


_OVERFLOW_PREFIX = "OVERFLOW_STATE_"


def overflow_json(room: common_pb2.Room) -> dict[str, Any] | None:
    """The room's overflow tier for `GET /api/rooms/{room}`: its state and where it plays; None if none."""
    if not room.HasField("overflow") or room.overflow.state == common_pb2.OVERFLOW_STATE_UNSPECIFIED:
        return None
    try:
        state = common_pb2.OverflowState.Name(room.overflow.state).removeprefix(_OVERFLOW_PREFIX)
    except ValueError:
        state = "UNKNOWN"
    return {
        "state": state,
        "playbackUrl": room.overflow.playback_url or None,
        "error": room.overflow.error or None,
    }
