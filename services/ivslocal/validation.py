"""Input checks IVS makes server-side: patterns, enums, lengths and ranges from the botocore model."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
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


# --- server-side composition: encoder configurations and compositions -------------------------------

ENCODER_CONFIGURATION_ARN = re.compile(r"arn:aws:ivs:[a-z0-9-]+:[0-9]+:encoder-configuration/[a-zA-Z0-9-]+")
COMPOSITION_ARN = re.compile(r"arn:aws:ivs:[a-z0-9-]+:[0-9]+:composition/[a-zA-Z0-9-]+")
CHANNEL_ARN = re.compile(r"arn:aws:ivs:[a-z0-9-]+:[0-9]+:channel/[a-zA-Z0-9-]+")
# S3DestinationConfiguration's StorageConfigurationArn has min 1, unlike the Stage recording's.
S3_STORAGE_CONFIGURATION_ARN = re.compile(
    r"arn:aws:ivs:[a-z0-9-]+:[0-9]+:storage-configuration/[a-zA-Z0-9-]+"
)
IDEMPOTENCY_TOKEN = re.compile(r"[a-zA-Z0-9-_]*")
ATTRIBUTE_KEY = re.compile(r"[a-zA-Z0-9-_]*")

VIDEO_ASPECT_RATIOS = ("AUTO", "VIDEO", "SQUARE", "PORTRAIT")
VIDEO_FILL_MODES = ("FILL", "COVER", "CONTAIN")
PIP_BEHAVIORS = ("STATIC", "DYNAMIC")
PIP_POSITIONS = ("TOP_LEFT", "TOP_RIGHT", "BOTTOM_LEFT", "BOTTOM_RIGHT")
RECORDING_FORMATS = ("HLS",)

# Checks one JSON member (its field name for messages, its value) and returns the value to keep.
Checker = Callable[[str, object], Any]

# The Video shape's documented defaults and its pixel ceiling (1920x1080 or 1080x1920).
VIDEO_DEFAULTS: dict[str, Any] = {"width": 1280, "height": 720, "framerate": 30.0, "bitrate": 2_500_000}
MAX_VIDEO_PIXELS = 2_073_600

# What a composition's layout says when the request leaves members out: the model's documented
# defaults, as the AWS CLI examples of StartComposition show them. Grid's videoFillMode is left out:
# the example shows "", which is not one of the model's values, and the doc calls it "not set".
GRID_DEFAULTS: dict[str, Any] = {
    "featuredParticipantAttribute": "",
    "gridGap": 2,
    "omitStoppedVideo": False,
    "videoAspectRatio": "VIDEO",
}
PIP_DEFAULTS: dict[str, Any] = {
    "featuredParticipantAttribute": "",
    "gridGap": 0,
    "omitStoppedVideo": False,
    "pipBehavior": "STATIC",
    "pipOffset": 0,
    "pipParticipantAttribute": "",
    "pipPosition": "BOTTOM_RIGHT",
    "videoFillMode": "COVER",
}


def encoder_configuration_arn(value: str, field: str = "arn") -> str:
    check_pattern(field, value, ENCODER_CONFIGURATION_ARN, 1, 128)
    return value


def composition_arn(value: str, field: str = "arn") -> str:
    check_pattern(field, value, COMPOSITION_ARN, 1, 128)
    return value


def idempotency_token(value: str | None) -> str | None:
    if value is not None:
        check_pattern("idempotencyToken", value, IDEMPOTENCY_TOKEN, 1, 64)
    return value


def video(value: Mapping[str, Any] | None) -> dict[str, Any]:
    """The Video of an encoder configuration with the model's defaults filled in."""
    given = _object("video", value) if value is not None else {}
    result = dict(VIDEO_DEFAULTS)
    if given.get("width") is not None:
        result["width"] = _int("video.width", given["width"], 2, 1920)
    if given.get("height") is not None:
        result["height"] = _int("video.height", given["height"], 2, 1920)
    if given.get("framerate") is not None:
        result["framerate"] = _float("video.framerate", given["framerate"], 1, 60)
    if given.get("bitrate") is not None:
        result["bitrate"] = _int("video.bitrate", given["bitrate"], 1, 8_500_000)
    if result["width"] % 2 or result["height"] % 2:
        raise ValidationError("video.width and video.height must be even numbers")
    if result["width"] * result["height"] > MAX_VIDEO_PIXELS:
        raise ValidationError(f"video.width x video.height must be at most {MAX_VIDEO_PIXELS} pixels")
    return result


def layout(value: Mapping[str, Any] | None) -> dict[str, Any]:
    """The LayoutConfiguration with the model's defaults filled in; no layout is the default grid."""
    given = _object("layout", value) if value is not None else {}
    grid, pip = given.get("grid"), given.get("pip")
    # Not stated by the model, which only says grid is the default; one composition has one layout.
    if grid is not None and pip is not None:
        raise ValidationError("layout takes either grid or pip, not both")
    if pip is not None:
        return {"pip": _members("layout.pip", _object("layout.pip", pip), _PIP_MEMBERS, PIP_DEFAULTS)}
    grid_given = _object("layout.grid", grid) if grid is not None else {}
    return {"grid": _members("layout.grid", grid_given, _GRID_MEMBERS, GRID_DEFAULTS)}


def destinations(value: list[Any]) -> list[dict[str, Any]]:
    """DestinationConfiguration items as IVS echoes them back (name "" when not given)."""
    if not 1 <= len(value) <= 2:
        raise ValidationError("destinations takes 1 or 2 items")
    result: list[dict[str, Any]] = []
    for index, item in enumerate(value):
        field = f"destinations[{index}]"
        given = _object(field, item)
        name = given.get("name")
        if name is not None:
            check_pattern(f"{field}.name", _str(f"{field}.name", name), NAME, 0, 128)
        channel, s3 = given.get("channel"), given.get("s3")
        if (channel is None) == (s3 is None):
            raise ValidationError(f"{field} takes exactly one of channel or s3")
        configuration: dict[str, Any] = {"name": name or ""}
        if channel is not None:
            configuration["channel"] = _channel_destination(f"{field}.channel", _object(field, channel))
        else:
            configuration["s3"] = _s3_destination(f"{field}.s3", _object(field, s3))
        result.append(configuration)
    kinds = ["channel" if "channel" in c else "s3" for c in result]
    # "A Composition can contain either one destination (channel or s3) or two (one channel and one s3)."
    if len(set(kinds)) != len(kinds):
        raise ValidationError("a composition takes at most one channel and one s3 destination")
    return result


def _channel_destination(field: str, given: Mapping[str, Any]) -> dict[str, Any]:
    arn = given.get("channelArn")
    if arn is None:
        raise ValidationError(f"{field}.channelArn is required")
    check_pattern(f"{field}.channelArn", _str(f"{field}.channelArn", arn), CHANNEL_ARN, 1, 128)
    result: dict[str, Any] = {"channelArn": arn}
    encoder = given.get("encoderConfigurationArn")
    if encoder is not None:
        encoder_configuration_arn(
            _str(f"{field}.encoderConfigurationArn", encoder), f"{field}.encoderConfigurationArn"
        )
        result["encoderConfigurationArn"] = encoder
    return result


def _s3_destination(field: str, given: Mapping[str, Any]) -> dict[str, Any]:
    storage = given.get("storageConfigurationArn")
    if storage is None:
        raise ValidationError(f"{field}.storageConfigurationArn is required")
    storage_field = f"{field}.storageConfigurationArn"
    check_pattern(storage_field, _str(storage_field, storage), S3_STORAGE_CONFIGURATION_ARN, 1, 128)
    encoders = given.get("encoderConfigurationArns")
    if encoders is None:
        raise ValidationError(f"{field}.encoderConfigurationArns is required")
    encoders = _str_list(f"{field}.encoderConfigurationArns", encoders, 1)
    if len(encoders) != 1:
        raise ValidationError(f"{field}.encoderConfigurationArns takes exactly 1 item")
    for arn in encoders:
        encoder_configuration_arn(arn, f"{field}.encoderConfigurationArns")
    result: dict[str, Any] = {"storageConfigurationArn": storage, "encoderConfigurationArns": encoders}
    # The CLI examples show the recording format echoed as HLS when the request gave none.
    recording_given = given.get("recordingConfiguration")
    recording_field = f"{field}.recordingConfiguration"
    recording = _object(recording_field, recording_given) if recording_given is not None else {}
    checked_recording: dict[str, Any] = {"format": "HLS"}
    if recording.get("format") is not None:
        check_enum(
            f"{recording_field}.format",
            _str(f"{recording_field}.format", recording["format"]),
            RECORDING_FORMATS,
        )
        checked_recording["format"] = recording["format"]
    if recording.get("hlsConfiguration") is not None:
        hls = _object(f"{recording_field}.hlsConfiguration", recording["hlsConfiguration"])
        checked_hls: dict[str, Any] = {}
        if hls.get("targetSegmentDurationSeconds") is not None:
            checked_hls["targetSegmentDurationSeconds"] = _int(
                "targetSegmentDurationSeconds", hls["targetSegmentDurationSeconds"], 2, 10
            )
        checked_recording["hlsConfiguration"] = checked_hls
    result["recordingConfiguration"] = checked_recording
    thumbnails_given = given.get("thumbnailConfigurations")
    if thumbnails_given is not None:
        thumbnails_field = f"{field}.thumbnailConfigurations"
        if not isinstance(thumbnails_given, list) or len(thumbnails_given) > 1:
            raise ValidationError(f"{thumbnails_field} must be a list of at most 1 object")
        thumbnails: list[dict[str, Any]] = []
        for thumbnail_given in thumbnails_given:
            thumbnail = _object(thumbnails_field, thumbnail_given)
            checked: dict[str, Any] = {}
            if thumbnail.get("targetIntervalSeconds") is not None:
                checked["targetIntervalSeconds"] = _int(
                    "targetIntervalSeconds", thumbnail["targetIntervalSeconds"], 1, 86400
                )
            if thumbnail.get("storage") is not None:
                storage_types = _str_list(f"{thumbnails_field}.storage", thumbnail["storage"], 2)
                for item in storage_types:
                    check_enum(f"{thumbnails_field}.storage", item, THUMBNAIL_STORAGE)
                checked["storage"] = storage_types
            thumbnails.append(checked)
        result["thumbnailConfigurations"] = thumbnails
    return result


def _members(
    field: str,
    given: Mapping[str, Any],
    members: Mapping[str, Checker],
    defaults: Mapping[str, Any],
) -> dict[str, Any]:
    """The known members of `given`, each checked by its checker, over `defaults`."""
    result = dict(defaults)
    for name, checker in members.items():
        if given.get(name) is not None:
            result[name] = checker(f"{field}.{name}", given[name])
    return result


def _attribute_key(field: str, value: object) -> str:
    check_pattern(field, _str(field, value), ATTRIBUTE_KEY, 0, 128)
    return str(value)


def _boolean(field: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValidationError(f"{field} must be a boolean")
    return value


def _one_of(allowed: tuple[str, ...]) -> Checker:
    def checker(field: str, value: object) -> str:
        check_enum(field, _str(field, value), allowed)
        return str(value)

    return checker


def _at_least(minimum: int) -> Checker:
    def checker(field: str, value: object) -> int:
        # The model gives these integers a minimum and no maximum; Java's int is the service's bound.
        return _int(field, value, minimum, 2**31 - 1)

    return checker


_GRID_MEMBERS: dict[str, Checker] = {
    "featuredParticipantAttribute": _attribute_key,
    "omitStoppedVideo": _boolean,
    "videoAspectRatio": _one_of(VIDEO_ASPECT_RATIOS),
    "videoFillMode": _one_of(VIDEO_FILL_MODES),
    "gridGap": _at_least(0),
    "participantOrderAttribute": _attribute_key,
}
_PIP_MEMBERS: dict[str, Checker] = {
    "featuredParticipantAttribute": _attribute_key,
    "omitStoppedVideo": _boolean,
    "videoFillMode": _one_of(VIDEO_FILL_MODES),
    "gridGap": _at_least(0),
    "pipParticipantAttribute": _attribute_key,
    "pipBehavior": _one_of(PIP_BEHAVIORS),
    "pipOffset": _at_least(0),
    "pipPosition": _one_of(PIP_POSITIONS),
    "pipWidth": _at_least(1),
    "pipHeight": _at_least(1),
    "participantOrderAttribute": _attribute_key,
}


def _str(field: str, value: object) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{field} must be a string")
    return value


def _float(field: str, value: object, minimum: float, maximum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(f"{field} must be a number")
    if not minimum <= value <= maximum:
        raise ValidationError(f"{field} must be between {minimum:g} and {maximum:g}")
    return float(value)
