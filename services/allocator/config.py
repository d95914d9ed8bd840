"""Allocator settings from FANOUT_* environment variables, validated at start."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.allocator.allocation import PlacementSettings
from services.common.capacity import read_capacity_limits
from services.common.env import ConfigError, Env
from services.common.ids import CLUSTER_ID_PATTERN, GRPC_ADDRESS_PATTERN
from services.common.ivs_settings import IvsSettings, read_ivs_settings
from services.common.metrics_endpoint import read_metrics_host
from services.common.redis_urls import LOCAL_REDIS_URL, REDIS_URL_PATTERN

TWO_WEEKS = 20160 * 60


@dataclass(frozen=True)
class AllocatorSettings:
    listen: str
    metrics_port: int
    metrics_host: str
    stagemanager_addr: str
    ivs: IvsSettings
    placement: PlacementSettings
    # ES384 tokens signed with our key (no IVS call per token); else CreateParticipantToken.
    self_signed: bool
    signing_key_file: Path | None
    # "memory" (one replica) or "redis" (replicas share the leases in `redis_url`, keys by cluster id).
    store: str
    redis_url: str | None
    cluster_id: str
    log_json: bool
    shutdown_grace_seconds: float


def read_settings(environ: Mapping[str, str]) -> AllocatorSettings:
    env = Env(environ)
    ivs = read_ivs_settings(environ)
    state_dir = Path(env.str("FANOUT_STATE_DIR", ".fanout"))
    limits = read_capacity_limits(env)
    key_file_value = env.raw("FANOUT_SIGNING_KEY_FILE")
    if ivs.mode == "local":
        key_file: Path | None = Path(key_file_value) if key_file_value else state_dir / "signing-key.pem"
    else:
        key_file = Path(key_file_value) if key_file_value else None
    self_signed = (
        env.choice("FANOUT_TOKEN_MODE", "self-signed" if key_file else "api", ("self-signed", "api"))
        == "self-signed"
    )
    if self_signed and key_file is None:
        raise ConfigError("FANOUT_TOKEN_MODE=self-signed needs FANOUT_SIGNING_KEY_FILE in AWS mode")
    store = env.choice("FANOUT_STORE", "memory", ("memory", "redis"))
    redis_url = env.str(
        "FANOUT_REDIS_URL", LOCAL_REDIS_URL if ivs.mode == "local" else "", pattern=REDIS_URL_PATTERN
    )
    if store == "redis" and not redis_url:
        raise ConfigError("FANOUT_STORE=redis needs FANOUT_REDIS_URL in AWS mode")
    return AllocatorSettings(
        listen=env.str("FANOUT_ALLOCATOR_LISTEN", "127.0.0.1:50062", pattern=GRPC_ADDRESS_PATTERN),
        metrics_port=env.int("FANOUT_ALLOCATOR_METRICS_PORT", 9462, minimum=0, maximum=65535),
        metrics_host=read_metrics_host(env),
        stagemanager_addr=env.str(
            "FANOUT_STAGEMANAGER_ADDR", "127.0.0.1:50061", pattern=GRPC_ADDRESS_PATTERN
        ),
        ivs=ivs,
        placement=PlacementSettings(
            limits=limits,
            lease_seconds=env.int("FANOUT_VIEWER_LEASE_SECONDS", 60, minimum=5, maximum=3600),
            viewer_token_seconds=env.int(
                "FANOUT_VIEWER_TOKEN_SECONDS", 12 * 3600, minimum=60, maximum=TWO_WEEKS
            ),
            observation_ttl_seconds=env.float(
                "FANOUT_OBSERVATION_TTL_SECONDS", 30.0, minimum=1.0, maximum=3600.0
            ),
            publisher_token_seconds=env.int(
                "FANOUT_PUBLISHER_TOKEN_SECONDS", 12 * 3600, minimum=60, maximum=TWO_WEEKS
            ),
        ),
        self_signed=self_signed,
        signing_key_file=key_file if self_signed else None,
        store=store,
        redis_url=redis_url if store == "redis" else None,
        cluster_id=env.str("FANOUT_CLUSTER_ID", "local", pattern=CLUSTER_ID_PATTERN),
        log_json=env.bool("FANOUT_LOG_JSON", ivs.mode == "aws"),
        shutdown_grace_seconds=env.float("FANOUT_SHUTDOWN_GRACE_SECONDS", 5.0, minimum=0, maximum=60),
    )
