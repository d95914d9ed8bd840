"""Settings of the IVS emulator, read from FANOUT_IVSLOCAL_* environment variables."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.common.env import ConfigError, Env

# The emulator pretends to be one account in one region; ARNs and token checks use these.
REGION = "us-east-1"
ACCOUNT_ID = "123456789012"

# Fixed IVS quotas (ivs-facts §3): not adjustable in AWS, so not settings here either.
PUBLISHERS_PER_STAGE = 12
PUBLIC_KEY_QUOTA = 3
# Adjustable in AWS (ivs-facts §3), so settings here, with AWS's defaults.
COMPOSITION_QUOTA = 20
COMPOSITIONS_PER_STAGE = 5
ENCODER_CONFIGURATION_QUOTA = 20

_URL = r"https?://[^\s]+"


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8099
    region: str = REGION
    account_id: str = ACCOUNT_ID
    stage_quota: int = 1000
    subscriber_quota: int = 10_000
    publisher_quota: int = PUBLISHERS_PER_STAGE
    public_key_quota: int = PUBLIC_KEY_QUOTA
    rate_limits: bool = False
    # Multiplies every operation's call rate: below 1 acts like an account whose budget other
    # tools already use, so callers meet real throttling.
    rate_scale: float = 1.0
    # IVS ends a session a few minutes after the last participant leaves; locally nobody wants to wait.
    session_end_delay_seconds: float = 0.0
    # Where the `IVS Stage Update` events go, as an EventBridge rule with an SQS target would deliver
    # them (services.ivslocal.eventbridge); None sends none. The endpoint is for a local SQS (moto).
    events_sqs_queue_url: str | None = None
    events_sqs_endpoint: str | None = None
    events_sqs_region: str = REGION
    composition_quota: int = COMPOSITION_QUOTA
    compositions_per_stage: int = COMPOSITIONS_PER_STAGE
    encoder_configuration_quota: int = ENCODER_CONFIGURATION_QUOTA
    # How long a composition stays STARTING before ACTIVE, and STOPPING before STOPPED: AWS takes
    # seconds; a caller should see the in-between state, but tests should not wait for it.
    composition_transition_seconds: float = 1.0
    # A composition stops on its own after this long without a publisher on its Stage (60 s in AWS).
    composition_idle_timeout_seconds: float = 60.0
    # STOPPED and FAILED compositions are deleted "after a few minutes" in AWS.
    composition_retention_seconds: float = 300.0
    # An ACTIVE composition subscribes to its Stage's publisher and serves HLS (services.ivslocal.composer);
    # off, compositions are the state machine alone.
    composition_media: bool = True
    # Where that HLS is written, one directory per channel; None: a temporary directory per run.
    media_dir: str | None = None


def load_settings(environ: Mapping[str, str]) -> Settings:
    """Reads and validates the settings; raises ConfigError naming the bad variable."""
    env = Env(environ)
    queue_url = env.str("FANOUT_IVSLOCAL_EVENTS_SQS_QUEUE_URL", "", pattern=_URL) or None
    endpoint = env.str("FANOUT_IVSLOCAL_EVENTS_SQS_ENDPOINT", "", pattern=_URL) or None
    if endpoint and not queue_url:
        raise ConfigError(
            "FANOUT_IVSLOCAL_EVENTS_SQS_ENDPOINT is set but FANOUT_IVSLOCAL_EVENTS_SQS_QUEUE_URL is not"
        )
    return Settings(
        host=env.str("FANOUT_IVSLOCAL_HOST", "127.0.0.1"),
        port=env.int("FANOUT_IVSLOCAL_PORT", 8099, minimum=0, maximum=65535),
        stage_quota=env.int("FANOUT_IVSLOCAL_STAGE_QUOTA", 1000, minimum=0),
        subscriber_quota=env.int("FANOUT_IVSLOCAL_SUBSCRIBER_QUOTA", 10_000, minimum=0),
        rate_limits=env.bool("FANOUT_IVSLOCAL_RATE_LIMITS", False),
        rate_scale=env.float("FANOUT_IVSLOCAL_RATE_SCALE", 1.0, minimum=0.01, maximum=100.0),
        session_end_delay_seconds=env.float(
            "FANOUT_IVSLOCAL_SESSION_END_DELAY_SECONDS", 0.0, minimum=0.0, maximum=3600.0
        ),
        events_sqs_queue_url=queue_url,
        events_sqs_endpoint=endpoint,
        events_sqs_region=env.str("FANOUT_IVSLOCAL_EVENTS_SQS_REGION", REGION, pattern=r"[a-z0-9-]+"),
        composition_quota=env.int("FANOUT_IVSLOCAL_COMPOSITION_QUOTA", COMPOSITION_QUOTA, minimum=0),
        compositions_per_stage=env.int(
            "FANOUT_IVSLOCAL_COMPOSITIONS_PER_STAGE", COMPOSITIONS_PER_STAGE, minimum=0
        ),
        encoder_configuration_quota=env.int(
            "FANOUT_IVSLOCAL_ENCODER_CONFIGURATION_QUOTA", ENCODER_CONFIGURATION_QUOTA, minimum=0
        ),
        composition_transition_seconds=env.float(
            "FANOUT_IVSLOCAL_COMPOSITION_TRANSITION_SECONDS", 1.0, minimum=0.0, maximum=600.0
        ),
        composition_idle_timeout_seconds=env.float(
            "FANOUT_IVSLOCAL_COMPOSITION_IDLE_TIMEOUT_SECONDS", 60.0, minimum=0.0, maximum=86400.0
        ),
        composition_retention_seconds=env.float(
            "FANOUT_IVSLOCAL_COMPOSITION_RETENTION_SECONDS", 300.0, minimum=0.0, maximum=86400.0
        ),
        composition_media=env.bool("FANOUT_IVSLOCAL_COMPOSITION_MEDIA", True),
        media_dir=env.str("FANOUT_IVSLOCAL_MEDIA_DIR", "") or None,
    )
