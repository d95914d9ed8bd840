"""The gateway's request parsing: pure functions from raw input to typed requests or a 4xx error."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway import validation
from gateway.errors import ApiError

ARN = "arn:aws:ivs:us-east-1:123456789012:stage/abcdABCDefgh"


def error_of(call: Any, *args: Any, **kwargs: Any) -> tuple[int, str]:
    with pytest.raises(ApiError) as raised:
        call(*args, **kwargs)
    return raised.value.status, raised.value.code


@pytest.mark.parametrize("room", ["main", "a", "0", "room-1", "9-lives", "a" * 64, "a-"])
def test_valid_rooms_pass_unchanged(room: str) -> None:
    assert validation.parse_room(room) == room


@pytest.mark.parametrize(
    "room",
    ["", "-a", "Main", "a_b", "a b", "a/b", "a.b", "mäin", "main\n", "a" * 65, 1, None, ["main"], True],
)
def test_invalid_rooms_are_refused(room: Any) -> None:
    assert error_of(validation.parse_room, room) == (400, "invalid_argument")


@pytest.mark.parametrize("user_id", ["u", "broadcaster", "Ünïcödé 👀", "with space", "x" * 128])
def test_valid_user_ids_pass_unchanged(user_id: str) -> None:
    assert validation.parse_user_id(user_id) == user_id


@pytest.mark.parametrize(
    "user_id", ["", "x" * 129, "a\x00b", "a\tb", "a\x7fb", "a\x85b", "a\ud800b", 7, None]
)
def test_invalid_user_ids_are_refused(user_id: Any) -> None:
    assert error_of(validation.parse_user_id, user_id) == (400, "invalid_argument")


@pytest.mark.parametrize(
    "arn", [ARN, "arn:aws:ivs:eu-west-1:1:stage/x", "arn:aws:ivs:us-east-1:123456789012:stage/a-b"]
)
def test_valid_stage_arns_pass(arn: str) -> None:
    assert validation.parse_stage_arn(arn) == arn


@pytest.mark.parametrize(
    "arn",
    [
        "",
        "stage/abc",
        "arn:aws:ivs:us-east-1:123456789012:channel/abcdABCDefgh",
        "arn:aws:ivs:us-east-1:acct:stage/abc",
        "arn:aws:ivs:US-EAST-1:123456789012:stage/abc",
        "arn:aws:ivs:us-east-1:123456789012:stage/",
        "arn:aws:ivs:us-east-1:123456789012:stage/abc/def",
        ARN + "\n",
        "arn:aws:ivs:us-east-1:123456789012:stage/" + "a" * 100,
        42,
    ],
)
def test_invalid_stage_arns_are_refused(arn: Any) -> None:
    assert error_of(validation.parse_stage_arn, arn) == (400, "invalid_argument")


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON"]
)
def test_json_object_is_decoded(content_type: str) -> None:
    assert validation.parse_json_object(b'{"room": "main", "extra": [1]}', content_type) == {
        "room": "main",
        "extra": [1],
    }


def test_empty_body_counts_as_an_empty_object_whatever_its_type() -> None:
    assert validation.parse_json_object(b"", None) == {}


@pytest.mark.parametrize(
    "content_type", [None, "", "text/plain", "application/x-www-form-urlencoded", "json"]
)
def test_a_body_that_is_not_declared_json_is_unsupported(content_type: str | None) -> None:
    assert error_of(validation.parse_json_object, b"{}", content_type) == (415, "unsupported_media_type")


def test_text_plain_is_accepted_only_where_allowed() -> None:
    decoded = validation.parse_json_object(b'{"a": 1}', "text/plain;charset=UTF-8", allow_text_plain=True)
    assert decoded == {"a": 1}
    assert error_of(validation.parse_json_object, b"{}", "text/html", allow_text_plain=True) == (
        415,
        "unsupported_media_type",
    )


@pytest.mark.parametrize(
    "raw", [b"{", b'{"a": 1} x', b"\xff\xfe", b"[" * 100_000, b'{"n": ' + b"9" * 10_000 + b"}", b"{'a': 1}"]
)
def test_broken_json_is_invalid_json(raw: bytes) -> None:
    assert error_of(validation.parse_json_object, raw, "application/json") == (400, "invalid_json")


@pytest.mark.parametrize("raw", [b"[]", b'"x"', b"1", b"null", b"true"])
def test_json_that_is_not_an_object_is_invalid_argument(raw: bytes) -> None:
    assert error_of(validation.parse_json_object, raw, "application/json") == (400, "invalid_argument")


def test_publisher_tokens_defaults_room_and_user() -> None:
    parsed = validation.parse_publisher_tokens({}, "main")
    assert (parsed.room, parsed.user_id) == ("main", "broadcaster")
    parsed = validation.parse_publisher_tokens({"room": None, "userId": None, "unknown": 1}, "main")
    assert (parsed.room, parsed.user_id) == ("main", "broadcaster")
    parsed = validation.parse_publisher_tokens({"room": "show-2", "userId": "alice"}, "main")
    assert (parsed.room, parsed.user_id) == ("show-2", "alice")


def test_viewer_without_user_id_gets_a_fresh_generated_one() -> None:
    first = validation.parse_viewer_token({}, "main")
    second = validation.parse_viewer_token({"room": "main"}, "main")
    assert first.room == "main"
    assert first.user_id.startswith("v-") and len(first.user_id) == 18
    assert validation.parse_user_id(first.user_id) == first.user_id
    assert first.user_id != second.user_id


def test_viewer_keeps_a_given_user_id() -> None:
    assert validation.parse_viewer_token({"userId": "bob", "room": "r"}, "main").user_id == "bob"


@pytest.mark.parametrize(
    "data",
    [{}, {"room": "main"}, {"userId": "u"}, {"room": None, "userId": "u"}, {"room": "main", "userId": ""}],
)
def test_viewer_lease_needs_room_and_user(data: dict[str, Any]) -> None:
    assert error_of(validation.parse_viewer_lease, data) == (400, "invalid_argument")


def test_viewer_lease_parses() -> None:
    parsed = validation.parse_viewer_lease({"room": "main", "userId": "u", "extra": True})
    assert (parsed.room, parsed.user_id) == ("main", "u")


@pytest.mark.parametrize("publishing", [True, False])
def test_publisher_status_parses(publishing: bool) -> None:
    parsed = validation.parse_publisher_status("main", {"stageArn": ARN, "publishing": publishing})
    assert (parsed.room, parsed.stage_arn, parsed.publishing) == ("main", ARN, publishing)


@pytest.mark.parametrize(
    ("room", "data"),
    [
        ("main", {"stageArn": ARN}),
        ("main", {"publishing": True}),
        ("main", {"stageArn": ARN, "publishing": "true"}),
        ("main", {"stageArn": ARN, "publishing": 0}),
        ("main", {"stageArn": ARN, "publishing": None}),
        ("main", {"stageArn": "nope", "publishing": True}),
        ("Main", {"stageArn": ARN, "publishing": True}),
    ],
)
def test_publisher_status_refuses_bad_input(room: str, data: dict[str, Any]) -> None:
    assert error_of(validation.parse_publisher_status, room, data) == (400, "invalid_argument")


def test_error_messages_never_echo_the_value() -> None:
    # A value may be a pasted secret; messages name the field, not the content.
    secret = "sk-" + "s" * 40
    with pytest.raises(ApiError) as raised:
        validation.parse_stage_arn(secret)
    assert secret not in raised.value.message
    with pytest.raises(ApiError) as raised:
        validation.parse_json_object(json.dumps([secret]).encode(), "application/json")
    assert secret not in raised.value.message


def test_client_address_trusts_only_the_configured_proxy_hops() -> None:
    from aiohttp.test_utils import make_mocked_request

    from gateway.middlewares import client_address

    request = make_mocked_request(
        "POST", "/api/token/viewer", headers={"X-Forwarded-For": "6.6.6.6, 203.0.113.9"}
    )
    assert client_address(request, 1) == "203.0.113.9"
    assert client_address(request, 2) == "6.6.6.6"
    assert client_address(request, 0) == (request.remote or "unknown")
    assert client_address(request, 3) == (request.remote or "unknown")
