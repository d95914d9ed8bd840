"""Request parsing: raw bodies and path parts into small typed objects, or a 4xx ApiError."""

from __future__ import annotations

import json
import secrets
import unicodedata
from dataclasses import dataclass
from typing import Any

from gateway.errors import InvalidArgument, InvalidJson, UnsupportedMediaType
from services.common.ids import (
    MAX_STAGE_ARN_LENGTH,
    MAX_USER_ID_LENGTH,
    PARTICIPANT_ID_PATTERN,
    ROOM_ID_PATTERN,
    STAGE_ARN_PATTERN,
)

# Cc: C0/C1 controls. Cs: lone surrogates, which JSON allows ("\ud800") but UTF-8/protobuf cannot carry.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cs"})


@dataclass(frozen=True)
class PublisherTokensRequest:
    room: str
    user_id: str


@dataclass(frozen=True)
class ViewerTokenRequest:
    room: str
    user_id: str


@dataclass(frozen=True)
class ViewerLeaseRequest:
    """Heartbeat and leave: both name one viewer's lease."""

    room: str
    user_id: str


@dataclass(frozen=True)
class PublisherStatusRequest:
    room: str
    stage_arn: str
    publishing: bool
    # The page's participant id on that Stage (optional): what the stage manager replicates.
    participant_id: str = ""


def media_type(content_type_header: str | None) -> str:
    """The media type without parameters, lower-cased ('Application/JSON; q=1' -> 'application/json')."""
    if not content_type_header:
        return ""
    return content_type_header.split(";", 1)[0].strip().lower()


def parse_json_object(
    body: bytes, content_type_header: str | None, *, allow_text_plain: bool = False
) -> dict[str, Any]:
    """Decodes a JSON object body. An empty body counts as {} so every field's own rule decides."""
    if not body:
        return {}
    accepted = {"application/json", "text/plain"} if allow_text_plain else {"application/json"}
    if media_type(content_type_header) not in accepted:
        raise UnsupportedMediaType()
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        # ValueError covers JSONDecodeError, bad UTF-8 and over-long integers; RecursionError deep nesting.
        raise InvalidJson() from None
    if not isinstance(data, dict):
        raise InvalidArgument("The request body must be a JSON object.")
    return data


def new_viewer_id() -> str:
    """An id for a viewer who did not bring one: 'v-' and 16 url-safe random characters."""
    return "v-" + secrets.token_urlsafe(12)


def parse_room(value: object, field: str = "room") -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"'{field}' must be a string.")
    if not ROOM_ID_PATTERN.fullmatch(value):
        raise InvalidArgument(
            f"'{field}' must be 1-64 characters of a-z, 0-9 and '-', starting with a letter or digit."
        )
    return value


def parse_user_id(value: object, field: str = "userId") -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"'{field}' must be a string.")
    if not 1 <= len(value) <= MAX_USER_ID_LENGTH:
        raise InvalidArgument(f"'{field}' must be 1-{MAX_USER_ID_LENGTH} characters.")
    if any(unicodedata.category(ch) in _FORBIDDEN_CATEGORIES for ch in value):
        raise InvalidArgument(f"'{field}' must not contain control characters.")
    return value


def parse_stage_arn(value: object, field: str = "stageArn") -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"'{field}' must be a string.")
    if len(value) > MAX_STAGE_ARN_LENGTH or not STAGE_ARN_PATTERN.fullmatch(value):
        raise InvalidArgument(f"'{field}' must be a Stage ARN (arn:aws:ivs:<region>:<account>:stage/<id>).")
    return value


def parse_publisher_tokens(data: dict[str, Any], default_room: str) -> PublisherTokensRequest:
    return PublisherTokensRequest(
        room=parse_room(_optional(data, "room", default_room)),
        user_id=parse_user_id(_optional(data, "userId", "broadcaster")),
    )


def parse_viewer_token(data: dict[str, Any], default_room: str) -> ViewerTokenRequest:
    room = parse_room(_optional(data, "room", default_room))
    user_id = data.get("userId")
    return ViewerTokenRequest(
        room=room, user_id=new_viewer_id() if user_id is None else parse_user_id(user_id)
    )


def parse_viewer_lease(data: dict[str, Any]) -> ViewerLeaseRequest:
    return ViewerLeaseRequest(
        room=parse_room(_required(data, "room")), user_id=parse_user_id(_required(data, "userId"))
    )


def parse_publisher_status(room: str, data: dict[str, Any]) -> PublisherStatusRequest:
    publishing = _required(data, "publishing")
    if not isinstance(publishing, bool):
        # A string "false" is truthy in too many languages to guess; insist on a JSON boolean.
        raise InvalidArgument("'publishing' must be true or false.")
    participant_id = _optional(data, "participantId", "")
    if not isinstance(participant_id, str) or (
        participant_id and not PARTICIPANT_ID_PATTERN.fullmatch(participant_id)
    ):
        raise InvalidArgument("'participantId' must be 1-64 characters of a-z, A-Z, 0-9, '-' and '_'.")
    return PublisherStatusRequest(
        room=parse_room(room),
        stage_arn=parse_stage_arn(_required(data, "stageArn")),
        publishing=publishing,
        participant_id=participant_id,
    )


def _optional(data: dict[str, Any], key: str, default: str) -> object:
    # JavaScript callers often send null for "not set"; treat it like an absent field.
    value = data.get(key)
    return default if value is None else value


def _required(data: dict[str, Any], key: str) -> object:
    value = data.get(key)
    if value is None:
        raise InvalidArgument(f"'{key}' is required.")
    return value
