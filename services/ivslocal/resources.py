"""What every kind of emulated resource shares: random ids and pages of list results behind a nextToken."""

from __future__ import annotations

import base64
import binascii
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from services.ivslocal import validation as check
from services.ivslocal.errors import ValidationError

_ALPHANUMERICS = string.ascii_letters + string.digits
_CURSOR_PREFIX = "ivslocal:"

T = TypeVar("T")


def random_id(length: int) -> str:
    return "".join(secrets.choice(_ALPHANUMERICS) for _ in range(length))


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_token: str | None


def paginate(
    items: list[T],
    key: Callable[[T], int],
    next_token: str | None,
    max_results: int | None,
    *,
    descending: bool = False,
) -> Page[T]:
    """A page of `items` (already in list order) after the item whose key the token names."""
    limit = check.max_results(max_results)
    if next_token:
        after = _decode_page_token(next_token)
        items = [item for item in items if (key(item) < after if descending else key(item) > after)]
    page = items[:limit]
    token = _encode_page_token(key(page[-1])) if len(items) > limit else None
    return Page(page, token)


def _encode_page_token(position: int) -> str:
    return base64.urlsafe_b64encode(f"{_CURSOR_PREFIX}{position}".encode()).decode("ascii")


def _decode_page_token(token: str) -> int:
    try:
        text = base64.urlsafe_b64decode(token.encode("ascii")).decode("ascii")
    except (binascii.Error, UnicodeError, ValueError):
        raise ValidationError("nextToken is invalid") from None
    if not text.startswith(_CURSOR_PREFIX) or not text[len(_CURSOR_PREFIX) :].isdigit():
        raise ValidationError("nextToken is invalid")
    return int(text[len(_CURSOR_PREFIX) :])
