"""Identifier rules shared by every service (DESIGN.md §2, ivs-facts §2.3)."""

from __future__ import annotations

import re

from services.common.errors import InvalidArgument

ROOM_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
# FANOUT_CLUSTER_ID: short enough to fit in Stage names and Redis key prefixes.
CLUSTER_ID_PATTERN = r"[a-z0-9][a-z0-9-]{0,31}"
# host:port of a gRPC listen or dial address, as the services' settings accept it.
GRPC_ADDRESS_PATTERN = r"[^\s]+:\d{1,5}"
STAGE_ARN_PATTERN = re.compile(r"arn:aws:ivs:[a-z0-9-]+:[0-9]+:stage/[a-zA-Z0-9-]+")
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
MAX_USER_ID_LENGTH = 128
MAX_STAGE_ARN_LENGTH = 128


def check_room_id(room: str) -> str:
    if not ROOM_ID_PATTERN.fullmatch(room):
        raise InvalidArgument(
            "room must be 1-64 characters of a-z, 0-9 and '-', starting with a letter or digit",
            code="invalid_room",
        )
    return room


def check_user_id(user_id: str) -> str:
    if not user_id or len(user_id) > MAX_USER_ID_LENGTH or _CONTROL_CHARACTERS.search(user_id):
        raise InvalidArgument(
            "userId must be 1-128 characters with no control characters", code="invalid_user_id"
        )
    return user_id


def check_stage_arn(arn: str) -> str:
    if len(arn) > MAX_STAGE_ARN_LENGTH or not STAGE_ARN_PATTERN.fullmatch(arn):
        raise InvalidArgument("stageArn is not an IVS stage ARN", code="invalid_stage_arn")
    return arn


def stage_id(arn: str) -> str:
    """The last path segment of a stage ARN: the token's `topic` claim."""
    return arn.rsplit("/", 1)[-1]


# A participant id: IVS assigns it, or it is the `jti` of a self-signed token (botocore ParticipantId).
PARTICIPANT_ID_PATTERN = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def check_participant_id(participant_id: str) -> str:
    if not PARTICIPANT_ID_PATTERN.fullmatch(participant_id):
        raise InvalidArgument(
            "participantId must be 1-64 characters of a-z, A-Z, 0-9, '-' and '_'",
            code="invalid_participant_id",
        )
    return participant_id
