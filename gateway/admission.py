"""Admission by the host app: verifies the tickets (JWTs) it signs and says who may view or publish where.

A ticket is a JWT with these claims (DESIGN §7, "Admission by the host app"):

- `room`: the room it admits to (a room id); `sub`: the subject, used as the userId;
- `role`: `viewer` or `publisher`; `exp`: required, short (a minute or two is plenty);
- `iss` / `aud`: checked when FANOUT_TICKET_ISSUER / FANOUT_TICKET_AUDIENCE are set.

The accepted algorithm comes from the key, never from the ticket's header alone: HS256 for the shared
secret; RS256 for RSA and ES256 for P-256 keys of a JWKS. `none` is never accepted.

Every ticket presented gets one outcome in fanout_gateway_tickets_total{role, outcome}: `accepted`, or
the first reason it was refused (TICKET_OUTCOMES). The answer to the client stays the same for every
invalid ticket; only the metric tells `expired` and `unknown_key` from `invalid`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import jwt
from jwt.exceptions import (
    ExpiredSignatureError,
    PyJWKClientConnectionError,
    PyJWKClientError,
    PyJWKSetError,
    PyJWTError,
)

from gateway.auth import PublisherAuth
from gateway.errors import ApiError, InvalidArgument, Unauthorized
from gateway.validation import parse_room, parse_user_id

if TYPE_CHECKING:
    from gateway.config import GatewaySettings
    from gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)

VIEWER = "viewer"
PUBLISHER = "publisher"
_ROLES = frozenset({VIEWER, PUBLISHER})
# Outcomes of fanout_gateway_tickets_total. `missing`: a viewer endpoint in jwt mode got no ticket.
TICKET_OUTCOMES = (
    "accepted",
    "missing",
    "expired",
    "invalid",
    "unknown_key",
    "wrong_room",
    "wrong_role",
    "wrong_subject",
    "keys_unavailable",
)
JWKS_REFRESH_OUTCOMES = ("ok", "failed")
_REQUIRED_CLAIMS = ["exp", "sub", "room", "role"]
# The one place a key type decides its algorithm.
_ALGORITHMS_BY_KEY_TYPE: Mapping[str, str] = {"RSA": "RS256", "EC": "ES256"}
_HMAC_ALGORITHM = "HS256"
_JWKS_FETCH_TIMEOUT_SECONDS = 5.0
_TICKET_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="fanout", error="invalid_token"'}


class InvalidTicket(ApiError):
    """Bad signature, expired, malformed, unknown key, wrong algorithm or claims: one answer for all,
    so the answer teaches a forger nothing. `reason` (`invalid`, `expired`, `unknown_key`) is for
    the metrics only and never reaches the client."""

    def __init__(self, reason: str = "invalid") -> None:
        super().__init__(401, "invalid_ticket", "The admission ticket is not valid.", _TICKET_CHALLENGE)
        self.reason = reason


class TicketRequired(ApiError):
    def __init__(self) -> None:
        super().__init__(
            401,
            "ticket_required",
            "This endpoint needs an admission ticket: 'Authorization: Bearer <ticket>'.",
            {"WWW-Authenticate": 'Bearer realm="fanout"'},
        )


class TicketMismatch(ApiError):
    """A valid ticket that does not cover this request: another room, role or subject."""

    def __init__(self, what: str) -> None:
        super().__init__(403, f"ticket_{what}_mismatch", f"The admission ticket is not for this {what}.")
        self.what = what


class TicketKeysUnavailable(ApiError):
    def __init__(self) -> None:
        super().__init__(
            503,
            "ticket_keys_unavailable",
            "The keys that verify admission tickets cannot be fetched; try again shortly.",
            {"Retry-After": "5"},
        )


@dataclass(frozen=True)
class Ticket:
    room: str
    subject: str
    role: str

    def require(self, *, room: str, role: str) -> None:
        """Raises TicketMismatch (403) unless this ticket admits `role` to `room`."""
        if self.role != role:
            raise TicketMismatch("role")
        if self.room != room:
            raise TicketMismatch("room")

    def admit_body(self, body: dict[str, Any], role: str) -> dict[str, Any]:
        """The request body with the ticket's room and subject; a different room or userId is refused
        rather than silently replaced, so a client bug shows up instead of acting for someone else."""
        self.require(room=body.get("room", self.room), role=role)
        self.check_user_id(body.get("userId"))
        return {**body, "room": self.room, "userId": self.subject}

    def check_user_id(self, given: object) -> None:
        if given is not None and given != self.subject:
            raise TicketMismatch("subject")


class _KeySource(Protocol):
    async def key_for(self, header: Mapping[str, Any]) -> tuple[Any, list[str]]:
        """The verification key and its one accepted algorithm; InvalidTicket for an unknown key."""


class SecretKey:
    def __init__(self, secret: str) -> None:
        self._secret = secret.encode()

    async def key_for(self, header: Mapping[str, Any]) -> tuple[Any, list[str]]:
        return self._secret, [_HMAC_ALGORITHM]


def _usable(key: jwt.PyJWK) -> tuple[Any, list[str]] | None:
    algorithm = _ALGORITHMS_BY_KEY_TYPE.get(key.key_type or "")
    # A JWK's own "alg" (or an EC curve other than P-256) must agree with the key type's algorithm.
    if algorithm is None or key.algorithm_name != algorithm:
        return None
    return key.key, [algorithm]


def _kid(header: Mapping[str, Any]) -> str:
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise InvalidTicket()
    return kid


class JwksFileKeys:
    """A JWKS read once at start; rotate by publishing through FANOUT_TICKET_JWKS_URL instead."""

    def __init__(self, path: Path) -> None:
        self._keys = {key.key_id: key for key in load_jwks_file(path) if key.key_id}

    async def key_for(self, header: Mapping[str, Any]) -> tuple[Any, list[str]]:
        key = self._keys.get(_kid(header))
        if key is None:
            raise InvalidTicket("unknown_key")
        usable = _usable(key)
        if usable is None:
            raise InvalidTicket()
        return usable


def load_jwks_file(path: Path) -> list[jwt.PyJWK]:
    """The signing keys of a JWKS file; raises ValueError (or OSError) when it has none usable."""
    keys = jwt.PyJWKSet.from_json(path.read_text(encoding="utf-8")).keys
    usable = [key for key in keys if key.key_id and key.public_key_use in ("sig", None) and _usable(key)]
    if not usable:
        raise ValueError("no RSA (RS256) or P-256 (ES256) signing key with a kid")
    return usable


_UNAVAILABLE = object()


class _CountingJwkClient(jwt.PyJWKClient):
    """PyJWKClient that reports every fetch of the key set: `ok`, or `failed` when the endpoint cannot
    be reached or answers something without a usable key."""

    def __init__(self, url: str, metrics: GatewayMetrics, **options: Any) -> None:
        super().__init__(url, **options)
        self._metrics = metrics
        # Lookups run on worker threads, so whether this call fetched is per thread.
        self._fetched = threading.local()

    def fetch_data(self) -> Any:
        self._fetched.value = True
        return super().fetch_data()

    def get_jwk_set(self, refresh: bool = False) -> jwt.PyJWKSet:
        self._fetched.value = False
        try:
            jwk_set = super().get_jwk_set(refresh)
        except Exception:
            if self._fetched.value:
                self._metrics.jwks_refreshes.labels("failed").inc()
            raise
        if self._fetched.value:
            self._metrics.jwks_refreshes.labels("ok").inc()
        return jwk_set


class JwksUrlKeys:
    """The host app's JWKS endpoint through PyJWKClient: the set is cached for `cache_seconds`, an
    unknown kid refetches it (so a newly published key works without a restart), but at most once per
    `min_refetch_seconds`, and a failing endpoint is not retried sooner either."""

    def __init__(
        self, url: str, *, cache_seconds: float, min_refetch_seconds: float, metrics: GatewayMetrics
    ) -> None:
        for outcome in JWKS_REFRESH_OUTCOMES:
            metrics.jwks_refreshes.labels(outcome)
        self._client = _CountingJwkClient(
            url,
            metrics,
            cache_jwk_set=True,
            lifespan=cache_seconds,
            cooldown_duration=min_refetch_seconds,
            timeout=_JWKS_FETCH_TIMEOUT_SECONDS,
        )
        self._min_refetch_seconds = min_refetch_seconds
        self._failed_at: float | None = None

    async def key_for(self, header: Mapping[str, Any]) -> tuple[Any, list[str]]:
        kid = _kid(header)
        if self._failed_at is not None and time.monotonic() - self._failed_at < self._min_refetch_seconds:
            raise TicketKeysUnavailable()
        cached = self._client.jwk_set_cache.get() if self._client.jwk_set_cache is not None else None
        known = next((key for key in cached.keys if key.key_id == kid), None) if cached is not None else None
        if known is not None:
            # The usual case, answered without leaving the event loop.
            return self._usable_or_refuse(known)
        # urllib underneath blocks; PyJWKClient's lock makes concurrent callers share one fetch.
        outcome = await asyncio.to_thread(self._lookup, kid)
        if outcome is _UNAVAILABLE:
            self._failed_at = time.monotonic()
            raise TicketKeysUnavailable()
        self._failed_at = None
        if not isinstance(outcome, jwt.PyJWK):
            raise InvalidTicket("unknown_key")
        return self._usable_or_refuse(outcome)

    @staticmethod
    def _usable_or_refuse(key: jwt.PyJWK) -> tuple[Any, list[str]]:
        usable = _usable(key) if key.public_key_use in ("sig", None) else None
        if usable is None:
            raise InvalidTicket()
        return usable

    def _lookup(self, kid: str) -> jwt.PyJWK | object | None:
        try:
            self._client.get_signing_keys()  # the cached set, fetched when empty or stale
        except (PyJWKClientError, PyJWKSetError, ValueError) as error:
            log.warning("cannot fetch the ticket JWKS: %s", type(error).__name__)
            return _UNAVAILABLE
        try:
            return self._client.get_signing_key(kid)
        except PyJWKClientConnectionError as error:
            log.warning("cannot refetch the ticket JWKS: %s", type(error).__name__)
            return _UNAVAILABLE
        except (PyJWKClientError, PyJWKSetError, ValueError):
            return None  # no such kid, even after a refetch


class TicketVerifier:
    """Verifies a ticket with PyJWT against one key source; answers a Ticket or raises InvalidTicket."""

    def __init__(
        self, keys: _KeySource, *, leeway_seconds: float, issuer: str | None, audience: str | None
    ) -> None:
        self._keys = keys
        self._leeway = leeway_seconds
        self._issuer = issuer
        self._audience = audience

    async def verify(self, ticket: str) -> Ticket:
        try:
            header = jwt.get_unverified_header(ticket)
        except PyJWTError:
            raise InvalidTicket() from None
        key, algorithms = await self._keys.key_for(header)
        try:
            claims = jwt.decode(
                ticket,
                key,
                algorithms=algorithms,
                options={"require": _REQUIRED_CLAIMS},
                leeway=self._leeway,
                issuer=self._issuer,
                audience=self._audience,
            )
        except PyJWTError as error:
            # The reason's category only: the error text may quote the ticket.
            log.debug("refused an admission ticket: %s", type(error).__name__)
            # PyJWT checks the signature before the claims: only a genuine ticket can be `expired`.
            reason = "expired" if isinstance(error, ExpiredSignatureError) else "invalid"
            raise InvalidTicket(reason) from None
        return _ticket_from(claims)


def _ticket_from(claims: Mapping[str, Any]) -> Ticket:
    role = claims["role"]
    try:
        room = parse_room(claims["room"])
        subject = parse_user_id(claims["sub"])
    except InvalidArgument:
        room = subject = ""
    if not room or not subject or not isinstance(role, str) or role not in _ROLES:
        log.debug("refused an admission ticket: claims out of range")
        raise InvalidTicket()
    return Ticket(room=room, subject=subject, role=role)


def build_ticket_verifier(settings: GatewaySettings, metrics: GatewayMetrics) -> TicketVerifier | None:
    """The verifier for the configured key source, or None when tickets are not configured."""
    keys: _KeySource
    if settings.ticket_secret:
        keys = SecretKey(settings.ticket_secret)
    elif settings.ticket_jwks_url:
        keys = JwksUrlKeys(
            settings.ticket_jwks_url,
            cache_seconds=settings.ticket_jwks_cache_seconds,
            min_refetch_seconds=settings.ticket_jwks_min_refetch_seconds,
            metrics=metrics,
        )
    elif settings.ticket_jwks_file is not None:
        keys = JwksFileKeys(settings.ticket_jwks_file)
    else:
        return None
    return TicketVerifier(
        keys,
        leeway_seconds=settings.ticket_leeway_seconds,
        issuer=settings.ticket_issuer,
        audience=settings.ticket_audience,
    )


def _bearer(authorization_header: str | None) -> str | None:
    if not authorization_header:
        return None
    scheme, _, presented = authorization_header.strip().partition(" ")
    presented = presented.strip()
    if scheme.lower() != "bearer" or not presented:
        return None
    return presented


class Admission:
    """Who may ask for viewer tokens and act as a publisher: static publisher keys, and tickets when a
    verifier is configured (required of viewers only in FANOUT_VIEWER_AUTH=jwt).

    A handler verifies first (`viewer`, `publisher`), then checks the ticket against its request
    (`admit_body`, `require`); each ticket is counted once, with the outcome of whichever step decides.
    """

    def __init__(
        self,
        publisher_auth: PublisherAuth,
        verifier: TicketVerifier | None,
        *,
        viewer_tickets: bool,
        metrics: GatewayMetrics,
    ) -> None:
        self._publisher_auth = publisher_auth
        self._verifier = verifier
        self._viewer_tickets = viewer_tickets
        self._metrics = metrics
        roles = (VIEWER, PUBLISHER) if viewer_tickets else (PUBLISHER,)
        if verifier is not None:
            # Pre-create the series so rate() works from the first scrape.
            for role in roles:
                for outcome in TICKET_OUTCOMES:
                    metrics.tickets.labels(role, outcome)

    async def viewer(self, authorization_header: str | None) -> Ticket | None:
        """None in open mode; otherwise the verified ticket (which `admit_body` checks is a viewer's)."""
        if not self._viewer_tickets or self._verifier is None:
            return None
        presented = _bearer(authorization_header)
        if presented is None:
            self._count(VIEWER, "missing")
            raise TicketRequired()
        return await self._verify(self._verifier, presented, VIEWER)

    async def publisher(self, authorization_header: str | None) -> Ticket | None:
        """None for a static publisher key, the verified ticket for a ticket; raises otherwise."""
        presented = _bearer(authorization_header)
        if presented is None:
            raise Unauthorized("This endpoint needs the publisher key: 'Authorization: Bearer <key>'.")
        if self._publisher_auth.is_valid(presented):
            return None
        if self._verifier is not None and presented.count(".") == 2:
            return await self._verify(self._verifier, presented, PUBLISHER)
        raise Unauthorized("The publisher key is not valid.")

    def admit_body(self, ticket: Ticket | None, body: dict[str, Any], role: str) -> dict[str, Any]:
        """The body as `Ticket.admit_body` makes it; unchanged without a ticket (open mode, static key)."""
        if ticket is None:
            return body
        with self._deciding(role):
            return ticket.admit_body(body, role)

    def require(self, ticket: Ticket | None, *, room: str, role: str, user_id: object = None) -> None:
        """Raises TicketMismatch unless the ticket (if any) admits `role` to `room` as `user_id`
        (None: any subject)."""
        if ticket is None:
            return
        with self._deciding(role):
            ticket.require(room=room, role=role)
            ticket.check_user_id(user_id)

    async def _verify(self, verifier: TicketVerifier, presented: str, role: str) -> Ticket:
        try:
            return await verifier.verify(presented)
        except InvalidTicket as refused:
            self._count(role, refused.reason)
            raise
        except TicketKeysUnavailable:
            self._count(role, "keys_unavailable")
            raise

    @contextmanager
    def _deciding(self, role: str) -> Iterator[None]:
        try:
            yield
        except TicketMismatch as refused:
            self._count(role, f"wrong_{refused.what}")
            raise
        self._count(role, "accepted")

    def _count(self, role: str, outcome: str) -> None:
        self._metrics.tickets.labels(role, outcome).inc()
