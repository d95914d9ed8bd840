"""Monitor settings from FANOUT_* environment variables, validated at start."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.common.env import Env
from services.common.ids import CLUSTER_ID_PATTERN, GRPC_ADDRESS_PATTERN
from services.common.ivs_quotas import OPERATION_RATES
from services.common.ivs_settings import IvsSettings, read_ivs_settings
from services.common.metrics_endpoint import read_metrics_host

# IVS allows 5 calls/s for each Stage operation the monitor uses (ivs-facts §3); it may use less.
MAX_STAGE_TPS = OPERATION_RATES["ListParticipants"]


@dataclass(frozen=True)
class SqsSettings:
    queue_url: str
    # Only for a local queue (e.g. moto); real SQS uses the region's endpoint.
    endpoint_url: str | None
    region: str
    wait_seconds: int


@dataclass(frozen=True)
class MonitorSettings:
    listen: str
    metrics_port: int
    metrics_host: str
    allocator_addr: str
    stagemanager_addr: str
    cluster_id: str
    ivs: IvsSettings
    # A pass over every Stage starts at most this often; a pass that takes longer is followed at once.
    interval_seconds: float
    # Calls per second per IVS operation the monitor allows itself (at most IVS's own rate).
    max_calls_per_second: float
    # ListParticipants pages one Stage may read per pass, so a 10k-viewer Stage cannot starve the others.
    pages_per_turn: int
    stage_quota: int
    report_timeout_seconds: float
    sqs: SqsSettings | None
    log_json: bool
    shutdown_grace_seconds: float


def read_settings(environ: Mapping[str, str]) -> MonitorSettings:
    env = Env(environ)
    ivs = read_ivs_settings(environ)
    queue_url = env.str("FANOUT_MONITOR_SQS_QUEUE_URL", "", pattern=r"https?://[^\s]+")
    sqs = (
        SqsSettings(
            queue_url=queue_url,
            endpoint_url=env.str("FANOUT_MONITOR_SQS_ENDPOINT", "", pattern=r"https?://[^\s]+") or None,
            region=ivs.region,
            wait_seconds=env.int("FANOUT_MONITOR_SQS_WAIT_SECONDS", 10, minimum=0, maximum=20),
        )
        if queue_url
        else None
    )
    return MonitorSettings(
        listen=env.str("FANOUT_MONITOR_LISTEN", "127.0.0.1:50063", pattern=GRPC_ADDRESS_PATTERN),
        metrics_port=env.int("FANOUT_MONITOR_METRICS_PORT", 9463, minimum=0, maximum=65535),
        metrics_host=read_metrics_host(env),
        allocator_addr=env.str("FANOUT_ALLOCATOR_ADDR", "127.0.0.1:50062", pattern=GRPC_ADDRESS_PATTERN),
        stagemanager_addr=env.str(
            "FANOUT_STAGEMANAGER_ADDR", "127.0.0.1:50061", pattern=GRPC_ADDRESS_PATTERN
        ),
        cluster_id=env.str("FANOUT_CLUSTER_ID", "local", pattern=CLUSTER_ID_PATTERN),
        ivs=ivs,
        interval_seconds=env.float("FANOUT_MONITOR_INTERVAL_SECONDS", 5.0, minimum=0.05, maximum=3600.0),
        max_calls_per_second=env.float(
            "FANOUT_MONITOR_MAX_CALLS_PER_SECOND", MAX_STAGE_TPS, minimum=0.1, maximum=MAX_STAGE_TPS
        ),
        pages_per_turn=env.int("FANOUT_MONITOR_PAGES_PER_TURN", 10, minimum=1, maximum=1000),
        stage_quota=env.int("FANOUT_IVS_STAGE_QUOTA", 1000, minimum=1, maximum=1_000_000),
        report_timeout_seconds=env.float(
            "FANOUT_MONITOR_REPORT_TIMEOUT_SECONDS", 2.0, minimum=0.1, maximum=60.0
        ),
        sqs=sqs,
        log_json=env.bool("FANOUT_LOG_JSON", ivs.mode == "aws"),
        shutdown_grace_seconds=env.float("FANOUT_SHUTDOWN_GRACE_SECONDS", 5.0, minimum=0, maximum=60),
    )
