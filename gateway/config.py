"""Gateway settings read once from FANOUT_* environment variables; a bad value names its variable."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jwt.exceptions import PyJWTError

from gateway.admission import load_jwks_file
from services.common.env import ConfigError, Env
from services.common.ids import ROOM_ID_PATTERN
from services.common.ivs_settings import read_mode
from services.common.timeouts import GATEWAY_ROOM_RPC_SECONDS, GATEWAY_RPC_SECONDS, READINESS_PROBE_SECONDS

# Same rule as a host:port the grpc library accepts for our purposes; DNS names, IPv4 and [IPv6].
_ADDRESS_PATTERN = r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}"
_HOST_PATTERN = r"[A-Za-z0-9.:-]+"
_REPO_WEB_DIR = Path(__file__).resolve().parent.parent / "web"


@dataclass(frozen=True)
class GatewaySettings:
    host: str = "127.0.0.1"
    port: int = 8080
    allocator_addr: str = "127.0.0.1:50062"
    stagemanager_addr: str = "127.0.0.1:50061"
    # Several keys so one can be rotated out while the other still works.
    publisher_keys: tuple[str, ...] = field(default=(), repr=False)  # secrets: never in a repr
    mode: str = "local"
    state_dir: Path = Path(".fanout")
    default_room: str = "main"
    viewer_lease_seconds: int = 60
    max_body_bytes: int = 16384
    # Per client IP; 0 turns the limiter off (benchmarks, trusted networks).
    rate_limit_per_second: float = 20.0
    rate_limit_burst: int = 40
    # Proxies in front of the gateway that append to X-Forwarded-For (an ingress: 1); 0 trusts none.
    trusted_proxy_hops: int = 0
    log_json: bool = False
    web_dir: Path = field(default=_REPO_WEB_DIR)
    # Most calls are one store round trip; EnsureRoom and EndRoom wait for IVS to create/delete Stages.
    rpc_timeout_seconds: float = GATEWAY_RPC_SECONDS
    room_rpc_timeout_seconds: float = GATEWAY_ROOM_RPC_SECONDS
    readiness_timeout_seconds: float = READINESS_PROBE_SECONDS
    # Comment lines on an idle event stream, so proxies and browsers keep it open.
    sse_keepalive_seconds: float = 15.0
    # A request's headers must be complete this long after its first byte (or after the connection
    # opened): bounds slow-header (slowloris) connections. Real clients send headers in one packet.
    http_header_timeout_seconds: float = 10.0
    # A declared body must arrive this long after the headers; bodies are at most max_body_bytes.
    http_body_timeout_seconds: float = 10.0
    # A keep-alive connection with no new request is closed after this. Longer than the usual 60 s
    # idle timeout of proxies and load balancers in front, so they close first and never reuse a
    # connection the gateway is closing; longer than the watch page's heartbeat interval.
    http_idle_seconds: float = 75.0
    # Open connections (event streams included) per gateway process; beyond it new connections get a
    # 503. Sized for thousands of viewers on direct keep-alive connections within the pod's memory.
    http_max_connections: int = 10_000
    # Processes serving the port (SO_REUSEPORT; the kernel spreads connections over them). Each has
    # its own gRPC channels, connection limit, rate limiter and /metrics; in Kubernetes keep 1 and
    # scale pods, so every scrape and limit covers one whole process.
    workers: int = 1
    # Admission by the host app (gateway/admission.py): "jwt" requires a ticket of viewers; any one
    # key source (secret, JWKS URL or file) also lets publisher tickets in, beside the static keys.
    viewer_auth: str = "open"
    ticket_secret: str = field(default="", repr=False)
    ticket_jwks_url: str | None = None
    ticket_jwks_file: Path | None = None
    ticket_issuer: str | None = None
    ticket_audience: str | None = None
    ticket_leeway_seconds: int = 30
    # PyJWKClient's cache of the key set, and the least time between two fetches: an unknown kid
    # refetches (rotation), but a flood of unknown kids cannot hammer the host app.
    ticket_jwks_cache_seconds: float = 300.0
    ticket_jwks_min_refetch_seconds: float = 30.0

    @property
    def heartbeat_seconds(self) -> int:
        """How often the watch page renews its lease: three chances before it lapses, never spammy."""
        return max(5, self.viewer_lease_seconds // 3)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> GatewaySettings:
        source = os.environ if environ is None else environ
        env = Env(source)
        mode = read_mode(source)
        keys = tuple(env.list("FANOUT_PUBLISHER_KEYS"))
        if mode == "aws" and not keys:
            # Local mode generates a key; in AWS a missing key would lock the broadcaster out silently.
            raise ConfigError("FANOUT_PUBLISHER_KEYS must be set in aws mode (comma-separated keys)")
        for key in keys:
            if len(key) < 16 or not key.isascii() or any(ch.isspace() for ch in key):
                # Never echo the value: it is a secret.
                raise ConfigError(
                    "FANOUT_PUBLISHER_KEYS: every key must be at least 16 printable ASCII characters"
                )
        rate = env.float("FANOUT_RATE_LIMIT_PER_SECOND", 20.0, minimum=0)
        header_timeout = env.float("FANOUT_HTTP_HEADER_TIMEOUT_SECONDS", 10.0, minimum=0.1, maximum=300.0)
        idle = env.float("FANOUT_HTTP_IDLE_SECONDS", 75.0, minimum=0.1, maximum=3600.0)
        if idle < header_timeout:
            # aiohttp's idle timer keeps running while a request's headers arrive, so a shorter idle
            # timeout would silently cut the header timeout too.
            raise ConfigError(
                f"FANOUT_HTTP_IDLE_SECONDS={idle} must be at least "
                f"FANOUT_HTTP_HEADER_TIMEOUT_SECONDS={header_timeout}"
            )
        web_dir_raw = env.raw("FANOUT_WEB_DIR")
        admission = _admission_settings(env)
        return cls(
            host=env.str("FANOUT_GATEWAY_HOST", "127.0.0.1", pattern=_HOST_PATTERN),
            port=env.int("FANOUT_GATEWAY_PORT", 8080, minimum=0, maximum=65535),
            allocator_addr=env.str("FANOUT_ALLOCATOR_ADDR", "127.0.0.1:50062", pattern=_ADDRESS_PATTERN),
            stagemanager_addr=env.str(
                "FANOUT_STAGEMANAGER_ADDR", "127.0.0.1:50061", pattern=_ADDRESS_PATTERN
            ),
            publisher_keys=keys,
            mode=mode,
            state_dir=Path(env.str("FANOUT_STATE_DIR", ".fanout")),
            default_room=env.str("FANOUT_DEFAULT_ROOM", "main", pattern=ROOM_ID_PATTERN.pattern),
            viewer_lease_seconds=env.int("FANOUT_VIEWER_LEASE_SECONDS", 60, minimum=5, maximum=3600),
            max_body_bytes=env.int("FANOUT_MAX_BODY_BYTES", 16384, minimum=256, maximum=1 << 20),
            rate_limit_per_second=rate,
            rate_limit_burst=env.int("FANOUT_RATE_LIMIT_BURST", max(1, int(rate * 2)), minimum=1),
            trusted_proxy_hops=env.int("FANOUT_TRUSTED_PROXY_HOPS", 0, minimum=0, maximum=10),
            log_json=env.bool("FANOUT_LOG_JSON", mode == "aws"),
            web_dir=Path(web_dir_raw) if web_dir_raw is not None else _REPO_WEB_DIR,
            sse_keepalive_seconds=env.float("FANOUT_SSE_KEEPALIVE_SECONDS", 15.0, minimum=1.0, maximum=300.0),
            http_header_timeout_seconds=header_timeout,
            http_body_timeout_seconds=env.float(
                "FANOUT_HTTP_BODY_TIMEOUT_SECONDS", 10.0, minimum=0.1, maximum=300.0
            ),
            http_idle_seconds=idle,
            http_max_connections=env.int("FANOUT_HTTP_MAX_CONNECTIONS", 10_000, minimum=1, maximum=1_000_000),
            workers=_workers(env),
            **admission,
        )


def _workers(env: Env) -> int:
    """FANOUT_GATEWAY_WORKERS: a count, or `auto` for one per CPU this process may run on."""
    if env.raw("FANOUT_GATEWAY_WORKERS") == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = env.int("FANOUT_GATEWAY_WORKERS", 1, minimum=1, maximum=64)
    if workers > 1 and env.int("FANOUT_GATEWAY_PORT", 8080, minimum=0, maximum=65535) == 0:
        # Port 0 would give every worker a port of its own.
        raise ConfigError("FANOUT_GATEWAY_WORKERS above 1 needs a fixed FANOUT_GATEWAY_PORT, not 0")
    return workers


def _admission_settings(env: Env) -> dict[str, Any]:
    viewer_auth = env.choice("FANOUT_VIEWER_AUTH", "open", ("open", "jwt"))
    secret = env.raw("FANOUT_TICKET_SECRET") or ""
    if secret and (len(secret) < 32 or not secret.isascii()):
        # Never echo the value: it is a secret. HS256 wants at least 256 bits of key.
        raise ConfigError("FANOUT_TICKET_SECRET must be at least 32 ASCII characters")
    jwks_url = env.str("FANOUT_TICKET_JWKS_URL", "", pattern=r"https?://[^\s]+") or None
    jwks_file_raw = env.raw("FANOUT_TICKET_JWKS_FILE")
    jwks_file = Path(jwks_file_raw) if jwks_file_raw is not None else None
    given = {
        "FANOUT_TICKET_SECRET": bool(secret),
        "FANOUT_TICKET_JWKS_URL": jwks_url is not None,
        "FANOUT_TICKET_JWKS_FILE": jwks_file is not None,
    }
    sources = [name for name, is_set in given.items() if is_set]
    if len(sources) > 1:
        raise ConfigError(f"set only one of {', '.join(sources)}: each is a complete source of ticket keys")
    if viewer_auth == "jwt" and not sources:
        raise ConfigError(
            "FANOUT_VIEWER_AUTH=jwt needs one of "
            "FANOUT_TICKET_SECRET, FANOUT_TICKET_JWKS_URL or FANOUT_TICKET_JWKS_FILE"
        )
    if jwks_file is not None:
        try:
            load_jwks_file(jwks_file)
        except (OSError, ValueError, PyJWTError) as error:
            raise ConfigError(
                f"FANOUT_TICKET_JWKS_FILE={str(jwks_file)!r} is not a usable JWKS: {type(error).__name__}"
            ) from None
    issuer = env.raw("FANOUT_TICKET_ISSUER")
    audience = env.raw("FANOUT_TICKET_AUDIENCE")
    return {
        "viewer_auth": viewer_auth,
        "ticket_secret": secret,
        "ticket_jwks_url": jwks_url,
        "ticket_jwks_file": jwks_file,
        "ticket_issuer": issuer,
        "ticket_audience": audience,
        "ticket_leeway_seconds": env.int("FANOUT_TICKET_LEEWAY_SECONDS", 30, minimum=0, maximum=300),
        "ticket_jwks_cache_seconds": env.float(
            "FANOUT_TICKET_JWKS_CACHE_SECONDS", 300.0, minimum=1.0, maximum=86_400.0
        ),
        "ticket_jwks_min_refetch_seconds": env.float(
            "FANOUT_TICKET_JWKS_MIN_REFETCH_SECONDS", 30.0, minimum=0.5, maximum=3600.0
        ),
    }
