"""REST-JSON shapes of ivs-realtime: typed reads of request bodies and the JSON of each model object."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from services.ivslocal.compositions import Composition, Destination, EncoderConfiguration
from services.ivslocal.errors import ValidationError
from services.ivslocal.model import (
    IssuedToken,
    Participant,
    ParticipantEvent,
    PublicKey,
    Replication,
    Stage,
    StageEndpoints,
    StageSession,
    TokenRequest,
)


class Body:
    """A JSON request body; each accessor checks the JSON type and raises ValidationError if wrong."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    @classmethod
    def parse(cls, raw: bytes) -> Body:
        if not raw.strip():
            return cls({})
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ValidationError("request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ValidationError("request body must be a JSON object")
        return cls(data)

    def required_text(self, name: str) -> str:
        value = self.text(name)
        if value is None:
            raise ValidationError(f"{name} is required")
        return value

    def text(self, name: str) -> str | None:
        value = self._data.get(name)
        if value is not None and not isinstance(value, str):
            raise ValidationError(f"{name} must be a string")
        return value

    def integer(self, name: str) -> int | None:
        value = self._data.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValidationError(f"{name} must be an integer")
        return value

    def boolean(self, name: str) -> bool | None:
        value = self._data.get(name)
        if value is not None and not isinstance(value, bool):
            raise ValidationError(f"{name} must be a boolean")
        return value

    def text_map(self, name: str) -> dict[str, str] | None:
        return _str_map(name, self._data.get(name))

    def text_list(self, name: str) -> list[str] | None:
        return _str_list(name, self._data.get(name))

    def objects(self, name: str) -> list[dict[str, Any]] | None:
        value = self._data.get(name)
        if value is not None and (
            not isinstance(value, list) or not all(isinstance(item, dict) for item in value)
        ):
            raise ValidationError(f"{name} must be a list of objects")
        return value

    def mapping(self, name: str) -> dict[str, Any] | None:
        value = self._data.get(name)
        if value is not None and not isinstance(value, dict):
            raise ValidationError(f"{name} must be an object")
        return value

    def token_requests(self, name: str) -> list[TokenRequest] | None:
        value = self._data.get(name)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            raise ValidationError(f"{name} must be a list of objects")
        return [token_request(Body(item)) for item in value]


def token_request(body: Body) -> TokenRequest:
    return TokenRequest(
        duration=body.integer("duration"),
        user_id=body.text("userId"),
        attributes=body.text_map("attributes"),
        capabilities=body.text_list("capabilities"),
    )


def _str_map(name: str, value: object) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValidationError(f"{name} must be an object of strings")
    return value


def _str_list(name: str, value: object) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValidationError(f"{name} must be a list of strings")
    return value


def timestamp(value: datetime) -> str:
    """ISO 8601 in UTC with a Z, as the API sends timestamps."""
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _compact(data: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in data.items() if value is not None}


def stage_json(stage: Stage, endpoints: StageEndpoints | None = None) -> dict[str, Any]:
    data = _compact(
        {
            "arn": stage.arn,
            "name": stage.name,
            "activeSessionId": stage.active_session_id,
            "tags": dict(stage.tags),
            "autoParticipantRecordingConfiguration": stage.recording_configuration,
        }
    )
    if endpoints is not None:
        data["endpoints"] = {
            "events": endpoints.events,
            "whip": endpoints.whip,
            "rtmp": endpoints.rtmp,
            "rtmps": endpoints.rtmps,
        }
    return data


def stage_summary_json(stage: Stage) -> dict[str, Any]:
    return _compact(
        {
            "arn": stage.arn,
            "name": stage.name,
            "activeSessionId": stage.active_session_id,
            "tags": dict(stage.tags),
        }
    )


def participant_token_json(issued: IssuedToken) -> dict[str, Any]:
    return _compact(
        {
            "token": issued.token,
            "participantId": issued.participant_id,
            "userId": issued.user_id,
            "attributes": dict(issued.attributes),
            "duration": issued.duration,
            "capabilities": list(issued.capabilities),
            "expirationTime": timestamp(issued.expiration_time),
        }
    )


def public_key_json(public_key: PublicKey) -> dict[str, Any]:
    return _compact(
        {
            "arn": public_key.arn,
            "name": public_key.name,
            "publicKeyMaterial": public_key.material,
            "fingerprint": public_key.fingerprint,
            "tags": dict(public_key.tags),
        }
    )


def public_key_summary_json(public_key: PublicKey) -> dict[str, Any]:
    return _compact({"arn": public_key.arn, "name": public_key.name, "tags": dict(public_key.tags)})


def stage_session_json(session: StageSession) -> dict[str, Any]:
    return _compact(
        {
            "sessionId": session.session_id,
            "startTime": timestamp(session.start_time),
            "endTime": timestamp(session.end_time) if session.end_time else None,
        }
    )


def participant_summary_json(participant: Participant) -> dict[str, Any]:
    return _compact(
        {
            "participantId": participant.participant_id,
            "userId": participant.user_id,
            "state": participant.state,
            "firstJoinTime": timestamp(participant.first_join_time),
            "published": participant.published,
            # Recording is not emulated.
            "recordingState": "DISABLED",
            "replicationType": participant.replication_type,
            "replicationState": participant.replication_state,
            "sourceStageArn": participant.source_stage_arn,
            "sourceSessionId": participant.source_session_id,
            "redundantIngest": False,
        }
    )


def participant_json(participant: Participant) -> dict[str, Any]:
    return {
        **participant_summary_json(participant),
        "attributes": dict(participant.attributes),
        "protocol": "WHIP",
    }


def participant_event_json(event: ParticipantEvent) -> dict[str, Any]:
    return _compact(
        {
            "name": event.name,
            "participantId": event.participant_id,
            "eventTime": timestamp(event.event_time),
            "remoteParticipantId": event.remote_participant_id,
            "destinationStageArn": event.destination_stage_arn,
            "destinationSessionId": event.destination_session_id,
            "replica": event.replica,
        }
    )


def participant_replica_json(replication: Replication) -> dict[str, Any]:
    return {
        "sourceStageArn": replication.source_stage_arn,
        "participantId": replication.participant_id,
        "sourceSessionId": replication.source_session_id,
        "destinationStageArn": replication.destination_stage_arn,
        "destinationSessionId": replication.destination_session_id,
        "replicationState": replication.state,
    }


def encoder_configuration_json(configuration: EncoderConfiguration) -> dict[str, Any]:
    return _compact(
        {
            "arn": configuration.arn,
            "name": configuration.name,
            "video": dict(configuration.video),
            "tags": dict(configuration.tags),
        }
    )


def encoder_configuration_summary_json(configuration: EncoderConfiguration) -> dict[str, Any]:
    return _compact({"arn": configuration.arn, "name": configuration.name, "tags": dict(configuration.tags)})


def destination_summary_json(destination: Destination) -> dict[str, Any]:
    return _compact(
        {
            "id": destination.destination_id,
            "state": destination.state,
            "startTime": timestamp(destination.start_time) if destination.start_time else None,
            "endTime": timestamp(destination.end_time) if destination.end_time else None,
        }
    )


def destination_json(destination: Destination) -> dict[str, Any]:
    return _compact(
        {
            **destination_summary_json(destination),
            "configuration": destination.configuration,
            "detail": destination.detail,
        }
    )


def composition_summary_json(composition: Composition) -> dict[str, Any]:
    return _compact(
        {
            "arn": composition.arn,
            "stageArn": composition.stage_arn,
            "destinations": [destination_summary_json(d) for d in composition.destinations],
            "state": composition.state,
            "tags": dict(composition.tags),
            "startTime": timestamp(composition.start_time),
            "endTime": timestamp(composition.end_time) if composition.end_time else None,
        }
    )


def composition_json(composition: Composition) -> dict[str, Any]:
    return _compact(
        {
            "arn": composition.arn,
            "stageArn": composition.stage_arn,
            "state": composition.state,
            "layout": composition.layout,
            "destinations": [destination_json(d) for d in composition.destinations],
            "tags": dict(composition.tags),
            "startTime": timestamp(composition.start_time),
            "endTime": timestamp(composition.end_time) if composition.end_time else None,
        }
    )
