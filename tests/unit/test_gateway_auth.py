"""Publisher auth: Bearer keys compared in constant time against every key, and local mode's key file."""

from __future__ import annotations

import hmac
import stat
from pathlib import Path
from typing import Any

import pytest

from gateway import auth
from gateway.auth import PublisherAuth, load_or_create_local_publisher_key
from gateway.errors import ApiError

OLD_KEY = "old-publisher-key-0123456789"
NEW_KEY = "new-publisher-key-9876543210"


def test_a_configured_key_is_accepted() -> None:
    PublisherAuth([OLD_KEY]).require(f"Bearer {OLD_KEY}")


def test_both_keys_work_during_rotation() -> None:
    rotating = PublisherAuth([OLD_KEY, NEW_KEY])
    rotating.require(f"Bearer {OLD_KEY}")
    rotating.require(f"Bearer {NEW_KEY}")
    rotating.require(f"bearer {NEW_KEY}")
    with pytest.raises(ApiError):
        rotating.require("Bearer some-other-key-00000000")


def test_a_retired_key_is_refused() -> None:
    with pytest.raises(ApiError) as raised:
        PublisherAuth([NEW_KEY]).require(f"Bearer {OLD_KEY}")
    assert (raised.value.status, raised.value.code) == (401, "unauthorized")
    assert OLD_KEY not in raised.value.message and NEW_KEY not in raised.value.message


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        OLD_KEY,
        f"Basic {OLD_KEY}",
        "Bearer",
        "Bearer ",
        f"Bearer {OLD_KEY}x",
        f"Bearer {OLD_KEY[:-1]}",
        f"Bearer {OLD_KEY.upper()}",
        "Bearer ключ-не-тот",
    ],
)
def test_missing_or_wrong_credentials_are_unauthorized(header: str | None) -> None:
    with pytest.raises(ApiError) as raised:
        PublisherAuth([OLD_KEY, NEW_KEY]).require(header)
    assert raised.value.status == 401
    assert raised.value.code == "unauthorized"
    assert raised.value.headers["WWW-Authenticate"].startswith("Bearer")


def test_no_configured_keys_refuses_everything() -> None:
    with pytest.raises(ApiError):
        PublisherAuth([]).require("Bearer ")
    assert not PublisherAuth([""]).is_valid("")


def test_every_key_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[Any, Any]] = []
    real_compare = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real_compare(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    rotating = PublisherAuth([OLD_KEY, NEW_KEY])

    # A match on the first key must not skip the second: timing would tell which key matched.
    assert rotating.is_valid(OLD_KEY)
    assert [a for a, _ in compared] == [OLD_KEY.encode(), NEW_KEY.encode()]
    compared.clear()
    assert not rotating.is_valid("wrong")
    assert len(compared) == 2
    assert all(isinstance(a, bytes) and isinstance(b, bytes) for a, b in compared)


def test_local_key_is_created_private_and_then_reused(tmp_path: Path) -> None:
    state_dir = tmp_path / "state" / "nested"

    key, created = load_or_create_local_publisher_key(state_dir)
    key_file = state_dir / auth.LOCAL_KEY_FILE

    assert created
    assert len(key) >= 32
    assert key_file.read_text().strip() == key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert load_or_create_local_publisher_key(state_dir) == (key, False)
    PublisherAuth([key]).require(f"Bearer {key}")


def test_local_key_file_left_readable_is_tightened(tmp_path: Path) -> None:
    key, _ = load_or_create_local_publisher_key(tmp_path)
    key_file = tmp_path / auth.LOCAL_KEY_FILE
    key_file.chmod(0o644)

    assert load_or_create_local_publisher_key(tmp_path) == (key, False)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_two_state_dirs_get_different_keys(tmp_path: Path) -> None:
    first, _ = load_or_create_local_publisher_key(tmp_path / "a")
    second, _ = load_or_create_local_publisher_key(tmp_path / "b")
    assert first != second
