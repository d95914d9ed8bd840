"""The P-384 private key that signs participant tokens: loaded from a PEM file, created in local mode."""

from __future__ import annotations

import logging
import os
import pathlib
import secrets
import stat

from cryptography.hazmat.primitives.asymmetric import ec

from services.common import jwt_es384

log = logging.getLogger(__name__)


class SigningKeyError(ValueError):
    """The signing key file is missing, unreadable, or not an EC P-384 private key."""


def load_private_key(path: pathlib.Path) -> ec.EllipticCurvePrivateKey:
    """Loads an existing PEM (PKCS#8 or SEC1, unencrypted) P-384 private key: the AWS-mode path."""
    try:
        pem = path.read_bytes()
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise SigningKeyError(f"signing key file {path} does not exist") from None
    except OSError as exc:
        raise SigningKeyError(f"cannot read signing key file {path}: {exc.strerror}") from None
    try:
        key = jwt_es384.private_key_from_pem(pem)
    except (ValueError, TypeError):
        # The underlying message could quote key material; name the file instead.
        raise SigningKeyError(f"{path} is not an unencrypted PEM EC P-384 (secp384r1) private key") from None
    # Group access is how a Kubernetes Secret reaches a non-root user (fsGroup); the world never needs it.
    if mode & stat.S_IRWXO:
        log.warning("signing key file %s is accessible to every user; it should be 0600 or 0440", path)
    return key


def load_or_create_private_key(path: pathlib.Path) -> ec.EllipticCurvePrivateKey:
    """Loads the key at `path`, or makes a new one there (mode 0600) if there is none: the local-mode path."""
    if path.exists():
        return load_private_key(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = jwt_es384.generate_private_key()
    # Written in full under a temporary name, then linked into place: a concurrent reader never sees a
    # half-written file, and if another process got there first its key wins and is the one returned.
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(jwt_es384.private_key_to_pem(key))
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return load_private_key(path)
    finally:
        temporary.unlink(missing_ok=True)
    log.info("created a new token signing key at %s", path)
    return key
