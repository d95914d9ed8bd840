"""Publisher authentication: a Bearer key checked in constant time against every configured key."""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from gateway.errors import Unauthorized

log = logging.getLogger(__name__)

LOCAL_KEY_FILE = "publisher-key"


class PublisherAuth:
    """Holds the accepted publisher keys; with none configured every request is refused (fail closed)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = tuple(key.encode() for key in keys if key)

    def is_valid(self, presented: str) -> bool:
        candidate = presented.encode("utf-8", errors="replace")
        matched = False
        # Compare against every key without stopping early, so timing does not tell which key (or
        # whether any) matched; compare_digest takes bytes so non-ASCII input cannot raise.
        for key in self._keys:
            matched |= hmac.compare_digest(key, candidate)
        return matched

    def require(self, authorization_header: str | None) -> None:
        """Raises Unauthorized unless the header is `Bearer <a configured key>`."""
        if not authorization_header:
            raise Unauthorized("This endpoint needs the publisher key: 'Authorization: Bearer <key>'.")
        scheme, _, presented = authorization_header.strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise Unauthorized("Use 'Authorization: Bearer <key>' with the publisher key.")
        if not self.is_valid(presented.strip()):
            raise Unauthorized("The publisher key is not valid.")


def load_or_create_local_publisher_key(state_dir: Path) -> tuple[str, bool]:
    """Local mode's key, kept in <state_dir>/publisher-key (0600); returns (key, created)."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_dir / LOCAL_KEY_FILE
    existing = _read_key(path)
    if existing is not None:
        return existing, False
    key = secrets.token_urlsafe(32)
    try:
        # O_EXCL: if two processes start together, exactly one writes and the other reads its key.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        existing = _read_key(path)
        if existing is None:
            raise
        return existing, False
    with os.fdopen(fd, "w", encoding="ascii") as file:
        os.fchmod(file.fileno(), 0o600)
        file.write(key + "\n")
    return key, True


def _read_key(path: Path) -> str | None:
    try:
        key = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    if path.stat().st_mode & 0o077:
        # The key is a password; tighten a copy that someone made readable by others.
        path.chmod(0o600)
    if not key:
        path.unlink()
        return None
    return key
