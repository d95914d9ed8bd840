"""Webhook settings from FANOUT_WEBHOOK_* environment variables, validated at start."""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from services.common.env import ConfigError, Env
from services.common.ids import CLUSTER_ID_PATTERN
from services.common.ivs_settings import read_mode
from services.common.redis_urls import LOCAL_REDIS_URL, REDIS_URL_PATTERN

SECRET_PREFIX = "whsec_"  # noqa: S105 - the format's prefix, not a secret
# The Standard Webhooks convention: 24 to 64 random bytes, base64-encoded after the prefix.
SECRET_BYTES = (24, 64)


@dataclass(frozen=True)
class Endpoint:
    """One URL of the host app. Only `label` (host[:port]) goes into logs and metrics: a URL may
    carry credentials or a token in its user info, path or query."""

    url: str = field(repr=False)
    label: str
    # Names the endpoint's deliveries in the outbox: stable for the same URL across restarts.
    key: str


@dataclass(frozen=True)
class WebhookSettings:
    endpoints: tuple[Endpoint, ...] = ()
    secret: str = field(default="", repr=False)
    # A delivery still failing this long after its event is dropped and counted failed.
    give_up_seconds: float = 3600.0
    # How often a room with viewers gets a room.viewers summary; 0 sends none.
    viewers_summary_seconds: float = 60.0
    timeout_seconds: float = 10.0
    # How often viewers are compared with each room's ceiling (capacity.warning / capacity.exhausted).
    capacity_check_seconds: float = 5.0
    # "memory" (one replica; pending events die with the process) or "redis" (they survive it).
    store: str = "memory"
    redis_url: str | None = None
    # FANOUT_CLUSTER_ID: the outbox's keys are namespaced by it, like the lease store's.
    namespace: str = "local"
    # The first retry waits about this long, each next one twice as long, up to retry_max_seconds.
    retry_base_seconds: float = 1.0
    retry_max_seconds: float = 600.0

    @property
    def enabled(self) -> bool:
        return bool(self.endpoints)


def read_webhook_settings(environ: Mapping[str, str]) -> WebhookSettings:
    env = Env(environ)
    endpoints = _read_endpoints(env)
    secret = _read_secret(env)
    if endpoints and not secret:
        raise ConfigError(
            "FANOUT_WEBHOOK_SECRET is required when FANOUT_WEBHOOK_URLS is set "
            f"({SECRET_PREFIX} followed by the base64 of {SECRET_BYTES[0]}-{SECRET_BYTES[1]} random bytes)"
        )
    # The outbox lives where the stage manager keeps its state unless told otherwise: with replicas
    # on Redis, the next leader then sends what the last one left pending.
    stores = ("memory", "redis")
    store = env.choice(
        "FANOUT_WEBHOOK_STORE", env.choice("FANOUT_STAGEMANAGER_STORE", "memory", stores), stores
    )
    local = read_mode(environ) == "local"
    redis_url = env.str("FANOUT_REDIS_URL", LOCAL_REDIS_URL if local else "", pattern=REDIS_URL_PATTERN)
    if endpoints and store == "redis" and not redis_url:
        raise ConfigError(
            "FANOUT_WEBHOOK_STORE (or FANOUT_STAGEMANAGER_STORE) = redis needs FANOUT_REDIS_URL in AWS mode"
        )
    give_up = env.float("FANOUT_WEBHOOK_GIVE_UP_SECONDS", 3600.0, minimum=1.0, maximum=3 * 86_400.0)
    timeout = env.float("FANOUT_WEBHOOK_TIMEOUT_SECONDS", 10.0, minimum=0.1, maximum=60.0)
    if timeout > give_up:
        raise ConfigError(
            f"FANOUT_WEBHOOK_TIMEOUT_SECONDS={timeout} is longer than "
            f"FANOUT_WEBHOOK_GIVE_UP_SECONDS={give_up}"
        )
    return WebhookSettings(
        endpoints=endpoints,
        secret=secret,
        give_up_seconds=give_up,
        viewers_summary_seconds=env.float(
            "FANOUT_WEBHOOK_VIEWERS_SUMMARY_SECONDS", 60.0, minimum=0.0, maximum=86_400.0
        ),
        timeout_seconds=timeout,
        capacity_check_seconds=env.float(
            "FANOUT_WEBHOOK_CAPACITY_CHECK_SECONDS", 5.0, minimum=0.05, maximum=600.0
        ),
        store=store,
        redis_url=redis_url if store == "redis" else None,
        namespace=env.str("FANOUT_CLUSTER_ID", "local", pattern=CLUSTER_ID_PATTERN),
    )


def _read_endpoints(env: Env) -> tuple[Endpoint, ...]:
    endpoints: list[Endpoint] = []
    labels: dict[str, int] = {}
    for position, url in enumerate(env.list("FANOUT_WEBHOOK_URLS"), start=1):
        # The message never repeats the URL: it may carry credentials.
        problem = f"FANOUT_WEBHOOK_URLS entry {position} is not an http(s) URL with a host"
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise ConfigError(problem) from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(problem)
        if any(endpoint.url == url for endpoint in endpoints):
            raise ConfigError(f"FANOUT_WEBHOOK_URLS entry {position} repeats an earlier entry")
        host = parts.hostname if port is None else f"{parts.hostname}:{port}"
        labels[host] = labels.get(host, 0) + 1
        # Two URLs on one host keep apart in the metrics.
        label = host if labels[host] == 1 else f"{host}#{labels[host]}"
        key = hashlib.sha256(url.encode()).hexdigest()[:16]
        endpoints.append(Endpoint(url=url, label=label, key=key))
    return tuple(endpoints)


def _read_secret(env: Env) -> str:
    value = env.raw("FANOUT_WEBHOOK_SECRET")
    if value is None:
        return ""
    # The message never repeats the value: it is a secret.
    problem = (
        f"FANOUT_WEBHOOK_SECRET must be {SECRET_PREFIX} followed by the base64 of "
        f"{SECRET_BYTES[0]}-{SECRET_BYTES[1]} random bytes"
    )
    if not value.startswith(SECRET_PREFIX):
        raise ConfigError(problem)
    try:
        key = base64.b64decode(value[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(problem) from None
    if not SECRET_BYTES[0] <= len(key) <= SECRET_BYTES[1]:
        raise ConfigError(problem)
    return value
