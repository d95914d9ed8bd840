"""Stage manager settings from FANOUT_* environment variables, validated at start."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from services.common.capacity import read_capacity_limits
from services.common.env import ConfigError, Env
from services.common.ids import CLUSTER_ID_PATTERN, GRPC_ADDRESS_PATTERN
from services.common.ivs_settings import IvsSettings, read_ivs_settings
from services.common.metrics_endpoint import read_metrics_host
from services.common.redis_urls import LOCAL_REDIS_URL, REDIS_URL_PATTERN
from services.stagemanager.autoscaler import AutoscalerSettings
from services.stagemanager.overflow import MODES, OverflowSettings
from services.stagemanager.rooms import RoomSettings
from services.webhooks.settings import WebhookSettings, read_webhook_settings


@dataclass(frozen=True)
class SharedStateSettings:
    """Several replicas on the deployment's Redis: one leads, the others serve reads and stand by."""

    redis_url: str
    # host:port where the other replicas reach this one (they forward writes to the leader).
    advertise_address: str
    lease_seconds: float


# Where `make run` would start moto's `ivs` server if it used a fixed port (it picks a free one and
# passes FANOUT_IVS_CHANNEL_ENDPOINT): `python -m moto.server -p 8098` beside a stage manager run alone.
LOCAL_IVS_CHANNEL_ENDPOINT = "http://127.0.0.1:8098"


@dataclass(frozen=True)
class StageManagerSettings:
    listen: str
    metrics_port: int
    metrics_host: str
    ivs: IvsSettings
    rooms: RoomSettings
    autoscaler: AutoscalerSettings
    allocator_addr: str
    log_json: bool
    shutdown_grace_seconds: float
    # None: one replica, state in memory (rebuilt from IVS tags after a restart).
    shared: SharedStateSettings | None = None
    overflow: OverflowSettings = field(default_factory=OverflowSettings)
    # Signed deliveries to the host app's URLs (none unless FANOUT_WEBHOOK_URLS is set).
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    # The `ivs` (low-latency channels) API: moto's server locally, the region's endpoint in AWS (None).
    channel_endpoint_url: str | None = None
    # Where a channel plays when not at its own playbackUrl, with {channel_id}: the emulator locally.
    playback_url_template: str | None = None


def read_settings(environ: Mapping[str, str]) -> StageManagerSettings:
    env = Env(environ)
    ivs = read_ivs_settings(environ)
    limits = read_capacity_limits(env)
    min_stages = env.int("FANOUT_MIN_STAGES", 1, minimum=1, maximum=100)
    if min_stages > limits.topology_stages:
        raise ConfigError(
            f"FANOUT_MIN_STAGES={min_stages} is more than the topology holds "
            f"(FANOUT_DIRECT_STAGES x (1 + FANOUT_REPLICAS_PER_ORIGIN) = {limits.topology_stages})"
        )
    if min_stages > limits.max_stages_per_room:
        raise ConfigError(
            f"FANOUT_MAX_STAGES_PER_ROOM={limits.max_stages_per_room} is below FANOUT_MIN_STAGES={min_stages}"
        )
    autoscaler = AutoscalerSettings(
        limits=limits,
        min_stages=min_stages,
        min_free_slots=env.int("FANOUT_MIN_FREE_SLOTS", 25, minimum=0, maximum=1_000_000),
        safety_factor=env.float("FANOUT_SCALE_SAFETY_FACTOR", 1.5, minimum=1.0, maximum=10.0),
        join_rate_window_seconds=env.float(
            "FANOUT_JOIN_RATE_WINDOW_SECONDS", 10.0, minimum=1.0, maximum=600.0
        ),
        default_lead_time_seconds=env.float(
            "FANOUT_PROVISIONING_LEAD_SECONDS", 3.0, minimum=0.1, maximum=600.0
        ),
        scale_in_cooldown_seconds=env.float(
            "FANOUT_SCALE_IN_COOLDOWN_SECONDS", 60.0, minimum=0.0, maximum=86_400.0
        ),
        room_idle_seconds=env.float("FANOUT_ROOM_IDLE_SECONDS", 1800.0, minimum=1.0, maximum=7 * 86_400.0),
        quota_retry_seconds=env.float("FANOUT_QUOTA_RETRY_SECONDS", 60.0, minimum=1.0, maximum=3600.0),
        tick_seconds=env.float("FANOUT_AUTOSCALER_TICK_SECONDS", 1.0, minimum=0.05, maximum=60.0),
    )
    listen = env.str("FANOUT_STAGEMANAGER_LISTEN", "127.0.0.1:50061", pattern=GRPC_ADDRESS_PATTERN)
    shared = None
    if env.choice("FANOUT_STAGEMANAGER_STORE", "memory", ("memory", "redis")) == "redis":
        redis_url = env.str(
            "FANOUT_REDIS_URL", LOCAL_REDIS_URL if ivs.mode == "local" else "", pattern=REDIS_URL_PATTERN
        )
        if not redis_url:
            raise ConfigError("FANOUT_STAGEMANAGER_STORE=redis needs FANOUT_REDIS_URL in AWS mode")
        shared = SharedStateSettings(
            redis_url=redis_url,
            advertise_address=env.str(
                "FANOUT_STAGEMANAGER_ADVERTISE_ADDR", listen, pattern=GRPC_ADDRESS_PATTERN
            ),
            lease_seconds=env.float("FANOUT_LEADER_LEASE_SECONDS", 6.0, minimum=1.0, maximum=120.0),
        )
    overflow = OverflowSettings(
        # On by default (DESIGN.md §5): past the real-time ceiling a viewer watches a few seconds late
        # instead of being turned away. A live room then costs a composition and a channel in AWS.
        mode=env.choice("FANOUT_OVERFLOW", "auto", MODES),
        check_seconds=env.float("FANOUT_OVERFLOW_CHECK_SECONDS", 10.0, minimum=0.5, maximum=600.0),
        retry_seconds=env.float("FANOUT_OVERFLOW_RETRY_SECONDS", 60.0, minimum=1.0, maximum=3600.0),
        start_at=env.float("FANOUT_OVERFLOW_START_AT", 0.0, minimum=0.0, maximum=1.0),
        idle_seconds=env.float("FANOUT_OVERFLOW_IDLE_SECONDS", 600.0, minimum=1.0, maximum=86400.0),
    )
    channel_endpoint = env.str("FANOUT_IVS_CHANNEL_ENDPOINT", "", pattern=r"https?://[^\s]+") or None
    if channel_endpoint is None and ivs.mode == "local":
        channel_endpoint = LOCAL_IVS_CHANNEL_ENDPOINT
    # Locally moto's playback URLs lead nowhere: the emulator serves each channel's composition as HLS.
    playback_default = ""
    if ivs.mode == "local":
        playback_default = f"{ivs.endpoint_url}/_playback/{{channel_id}}/index.m3u8"
    playback_template = env.str("FANOUT_OVERFLOW_PLAYBACK_URL", playback_default, pattern=r"(https?://\S+)?")
    return StageManagerSettings(
        shared=shared,
        overflow=overflow,
        playback_url_template=playback_template or None,
        webhooks=read_webhook_settings(environ),
        channel_endpoint_url=channel_endpoint,
        listen=listen,
        metrics_port=env.int("FANOUT_STAGEMANAGER_METRICS_PORT", 9461, minimum=0, maximum=65535),
        metrics_host=read_metrics_host(env),
        ivs=ivs,
        rooms=RoomSettings(
            cluster_id=env.str("FANOUT_CLUSTER_ID", "local", pattern=CLUSTER_ID_PATTERN),
            limits=limits,
            min_stages=min_stages,
            replication_check_seconds=env.float(
                "FANOUT_REPLICATION_CHECK_SECONDS", 10.0, minimum=0.5, maximum=600.0
            ),
            replication_reconnect_seconds=env.int(
                "FANOUT_REPLICATION_RECONNECT_SECONDS", 10, minimum=0, maximum=300
            ),
            publisher_grace_seconds=env.float(
                "FANOUT_PUBLISHER_GRACE_SECONDS", 10.0, minimum=0.0, maximum=600.0
            ),
        ),
        autoscaler=autoscaler,
        allocator_addr=env.str("FANOUT_ALLOCATOR_ADDR", "127.0.0.1:50062", pattern=GRPC_ADDRESS_PATTERN),
        log_json=env.bool("FANOUT_LOG_JSON", ivs.mode == "aws"),
        shutdown_grace_seconds=env.float("FANOUT_SHUTDOWN_GRACE_SECONDS", 5.0, minimum=0, maximum=60),
    )
