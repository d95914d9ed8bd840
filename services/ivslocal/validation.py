"""Input checks IVS makes server-side: patterns, enums, lengths and ranges from the botocore model."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from services.ivslocal.errors import ValidationError

STAGE_ARN = re.compile(r"arn:aws:ivs:[a-z0-9-]+:[0-9]+:stage/[a-zA-Z0-9-]+")
PUBLIC_KEY_ARN = re.compile(r"arn:aws:ivs:[a-z0-9-]+:[0-9]+:public-key/[a-zA-Z0-9-]+")
# The model's ResourceArn regex allows one character before "/" (ivs-facts §2.0); this is what it means.
RESOURCE_ARN = re.compile(r"arn:aws:ivs:[a-z0-9-]+:[0-9]+:[a-z-]+/[a-zA-Z0-9-]+")
STORAGE_CONFIGURATION_ARN = re.compile(r"|arn:aws:ivs:[a-z0-9-]+:[0-9]+:storage-configuration/[a-zA-Z0-9-]+")
NAME = re.compile(r"[a-zA-Z0-9-_]*")
PARTICIPANT_ID = re.compile(r"[a-zA-Z0-9-_]*")
SESSION_ID = re.compile(r"st-[a-zA-Z0-9]+")
PUBLIC_KEY_MATERIAL = re.compile(
    r".*-----BEGIN PUBLIC KEY-----\r?\n([a-zA-Z0-9+/=\r\n]+)\r?\n-----END PUBLIC KEY-----(\r?\n)?.*",
    re.DOTALL,
)

CAPABILITIES = ("PUBLISH", "SUBSCRIBE")
PARTICIPANT_STATES = ("CONNECTED", "DISCONNECTED")
RECORDING_STATES = ("STARTING", "ACTIVE", "STOPPING", "STOPPED", "FAILED")
RECORDING_MEDIA_TYPES = ("AUDIO_VIDEO", "AUDIO_ONLY", "NONE")
THUMBNAIL_STORAGE = ("SEQUENTIAL", "LATEST")
THUMBNAIL_RECORDING_MODES = ("INTERVAL", "DISABLED")

MAX_TAGS = 50
MAX_ATTRIBUTES_BYTES = 1024


def check_length(field: str, value: str, minimum: int, maximum: int) -> None:
    if not minimum <= len(value) <= maximum:
        raise ValidationError(f"{field} must be {minimum} to {maximum} characters long")


def check_pattern(field: str, value: str, pattern: re.Pattern[str], minimum: int, maximum: int) -> None:
    check_length(field, value, minimum, maximum)
    if not pattern.fullmatch(value):
        raise ValidationError(f"{field} {value!r} does not match {pattern.pattern}")


def check_range(field: str, value: int, minimum: int, maximum: int) -> None:
    if not minimum <= value <= maximum:
        raise ValidationError(f"{field} must be between {minimum} and {maximum}")


def check_enum(field: str, value: str, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValidationError(f"{field} {value!r} must be one of {', '.join(allowed)}")


def stage_arn(value: str, field: str = "arn") -> str:
    check_pattern(field, value, STAGE_ARN, 1, 128)
    return value


def public_key_arn(value: str, field: str = "arn") -> str:
    check_pattern(field, value, PUBLIC_KEY_ARN, 1, 128)
    return value


def resource_arn(value: str) -> str:
    check_pattern("resourceArn", value, RESOURCE_ARN, 1, 128)
    return value


def name(value: str | None, field: str = "name") -> str | None:
    if value is not None:
        check_pattern(field, value, NAME, 0, 128)
    return value


def session_id(value: str) -> str:
    check_pattern("sessionId", value, SESSION_ID, 16, 16)
    return value


def participant_id(value: str) -> str:
    check_pattern("participantId", value, PARTICIPANT_ID, 0, 64)
    return value


def tags(value: Mapping[str, str] | None) -> dict[str, str]:
    if value is None:
        return {}
    if len(value) > MAX_TAGS:
        raise ValidationError(f"at most {MAX_TAGS} tags are allowed")
    for key, tag_value in value.items():
        check_length("tag key", key, 1, 128)
        check_length("tag value", tag_value, 0, 256)
        if key.lower().startswith("aws:"):
            raise ValidationError("tag keys starting with aws: are reserved")
    return dict(value)


def tag_keys(value: list[str]) -> list[str]:
    if len(value) > MAX_TAGS:
        raise ValidationError(f"at most {MAX_TAGS} tagKeys are allowed")
    for key in value:
        check_length("tagKeys", key, 1, 128)
    return value


def max_results(value: int | None, default: int = 50, maximum: int = 100) -> int:
    if value is None:
        return default
    check_range("maxResults", value, 1, maximum)
    return value


def reconnect_window_seconds(value: int | None) -> int:
    if value is None:
        return 0
    check_range("reconnectWindowSeconds", value, 0, 300)
    return value


def duration_minutes(value: int | None) -> int:
    if value is None:
        return 720
    check_range("duration", value, 1, 20160)
    return value


def user_id(value: str | None, field: str = "userId") -> str | None:
    if value is not None:
        check_length(field, value, 0, 128)
    return value


def attributes(value: Mapping[str, str] | None) -> dict[str, str]:
    if value is None:
        return {}
    size = sum(len(k.encode()) + len(v.encode()) for k, v in value.items())
    if size > MAX_ATTRIBUTES_BYTES:
        raise ValidationError(f"attributes must total at most {MAX_ATTRIBUTES_BYTES} bytes")
    return dict(value)


def capabilities(value: list[str] | None) -> list[str]:
    if value is None:
        return list(CAPABILITIES)
    if len(value) > 2:
        raise ValidationError("capabilities takes at most 2 items")
    for item in value:
        check_enum("capabilities", item, CAPABILITIES)
    return list(dict.fromkeys(value))


def public_key_material(value: str) -> str:
    if not PUBLIC_KEY_MATERIAL.fullmatch(value):
        raise ValidationError("publicKeyMaterial must be a PEM public key (BEGIN PUBLIC KEY)")
    return value


def recording_configuration(value: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """autoParticipantRecordingConfiguration, kept as given once its fields check out."""
    if value is None:
        return None
    field = "autoParticipantRecordingConfiguration"
    arn = value.get("storageConfigurationArn")
    if not isinstance(arn, str):
        raise ValidationError(f"{field}.storageConfigurationArn is required")
    check_pattern(f"{field}.storageConfigurationArn", arn, STORAGE_CONFIGURATION_ARN, 0, 128)
    result: dict[str, Any] = {"storageConfigurationArn": arn}
    if "mediaTypes" in value:
        media = _str_list(f"{field}.mediaTypes", value["mediaTypes"], 1)
        for item in media:
            check_enum(f"{field}.mediaTypes", item, RECORDING_MEDIA_TYPES)
        result["mediaTypes"] = media
    if "thumbnailConfiguration" in value:
        thumbnail = _object(f"{field}.thumbnailConfiguration", value["thumbnailConfiguration"])
        checked: dict[str, Any] = {}
        if "targetIntervalSeconds" in thumbnail:
            checked["targetIntervalSeconds"] = _int(
                "targetIntervalSeconds", thumbnail["targetIntervalSeconds"], 1, 86400
            )
        if "storage" in thumbnail:
            storage = _str_list("thumbnailConfiguration.storage", thumbnail["storage"], 2)
            for item in storage:
                check_enum("thumbnailConfiguration.storage", item, THUMBNAIL_STORAGE)
            checked["storage"] = storage
        if "recordingMode" in thumbnail:
            mode = thumbnail["recordingMode"]
            if not isinstance(mode, str):
                raise ValidationError("thumbnailConfiguration.recordingMode must be a string")
            check_enum("thumbnailConfiguration.recordingMode", mode, THUMBNAIL_RECORDING_MODES)
            checked["recordingMode"] = mode
        result["thumbnailConfiguration"] = checked
    if "recordingReconnectWindowSeconds" in value:
        result["recordingReconnectWindowSeconds"] = _int(
            "recordingReconnectWindowSeconds", value["recordingReconnectWindowSeconds"], 0, 300
        )
    if "hlsConfiguration" in value:
        hls = _object(f"{field}.hlsConfiguration", value["hlsConfiguration"])
        result["hlsConfiguration"] = {}
        if "targetSegmentDurationSeconds" in hls:
            result["hlsConfiguration"]["targetSegmentDurationSeconds"] = _int(
                "targetSegmentDurationSeconds", hls["targetSegmentDurationSeconds"], 2, 10
            )
    if "recordParticipantReplicas" in value:
        if not isinstance(value["recordParticipantReplicas"], bool):
            raise ValidationError("recordParticipantReplicas must be a boolean")
        result["recordParticipantReplicas"] = value["recordParticipantReplicas"]
    return result


def _object(field: str, value: object) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ValidationError(f"{field} must be an object")
    return value


def _int(field: str, value: object, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{field} must be an integer")
    check_range(field, value, minimum, maximum)
    return value


def _str_list(field: str, value: object, max_items: int) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValidationError(f"{field} must be a list of strings")
    if len(value) > max_items:
        raise ValidationError(f"{field} takes at most {max_items} items")
    return list(value)
