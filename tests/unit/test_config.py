"""Settings are validated at start, and a bad value names its variable."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from gateway.config import GatewaySettings
from services.allocator.config import read_settings as read_allocator
from services.common.env import ConfigError
from services.common.ivs_settings import read_ivs_settings, read_mode
from services.monitor.config import read_settings as read_monitor
from services.stagemanager.config import read_settings as read_stagemanager


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"FANOUT_MIN_STAGES": "0"}, "FANOUT_MIN_STAGES"),
        ({"FANOUT_MIN_STAGES": "three"}, "FANOUT_MIN_STAGES"),
        ({"FANOUT_CLUSTER_ID": "Has Spaces"}, "FANOUT_CLUSTER_ID"),
        ({"FANOUT_CLUSTER_ID": "x" * 40}, "FANOUT_CLUSTER_ID"),
        ({"FANOUT_MODE": "cloud"}, "FANOUT_MODE"),
        ({"FANOUT_LOG_JSON": "maybe"}, "FANOUT_LOG_JSON"),
        ({"FANOUT_STAGEMANAGER_LISTEN": "no-port"}, "FANOUT_STAGEMANAGER_LISTEN"),
        ({"FANOUT_SHUTDOWN_GRACE_SECONDS": "nan"}, "FANOUT_SHUTDOWN_GRACE_SECONDS"),
        ({"FANOUT_IVS_ENDPOINT": "ftp://x"}, "FANOUT_IVS_ENDPOINT"),
        ({"FANOUT_MODE": "aws"}, "AWS_REGION"),
        # IVS replicates one participant into at most 5 Stages, and nothing can make it 6.
        ({"FANOUT_REPLICAS_PER_ORIGIN": "6"}, "FANOUT_REPLICAS_PER_ORIGIN"),
        ({"FANOUT_DIRECT_STAGES": "0"}, "FANOUT_DIRECT_STAGES"),
        ({"FANOUT_MIN_STAGES": "7"}, "FANOUT_MIN_STAGES"),  # more than 1 x (1 + 5)
        ({"FANOUT_REGION_STAGE_QUOTA": "-1"}, "FANOUT_REGION_STAGE_QUOTA"),
        ({"FANOUT_STAGEMANAGER_STORE": "etcd"}, "FANOUT_STAGEMANAGER_STORE"),
        (
            {"FANOUT_MODE": "aws", "AWS_REGION": "us-east-1", "FANOUT_STAGEMANAGER_STORE": "redis"},
            "FANOUT_REDIS_URL",
        ),
        (
            {"FANOUT_STAGEMANAGER_STORE": "redis", "FANOUT_LEADER_LEASE_SECONDS": "0.1"},
            "FANOUT_LEADER_LEASE_SECONDS",
        ),
        (
            {"FANOUT_STAGEMANAGER_ADVERTISE_ADDR": "no-port", "FANOUT_STAGEMANAGER_STORE": "redis"},
            "FANOUT_STAGEMANAGER_ADVERTISE_ADDR",
        ),
    ],
)
def test_stage_manager_rejects_bad_values_naming_the_variable(environ: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        read_stagemanager(environ)


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"FANOUT_STAGE_CAPACITY": "0"}, "FANOUT_STAGE_CAPACITY"),
        ({"FANOUT_STAGE_CAPACITY": "100", "FANOUT_STAGE_HARD_LIMIT": "50"}, "FANOUT_STAGE_HARD_LIMIT"),
        ({"FANOUT_VIEWER_LEASE_SECONDS": "1"}, "FANOUT_VIEWER_LEASE_SECONDS"),
        ({"FANOUT_VIEWER_TOKEN_SECONDS": "99999999"}, "FANOUT_VIEWER_TOKEN_SECONDS"),
        ({"FANOUT_TOKEN_MODE": "magic"}, "FANOUT_TOKEN_MODE"),
        ({"FANOUT_STORE": "postgres"}, "FANOUT_STORE"),
        ({"FANOUT_STORE": "redis", "FANOUT_REDIS_URL": "http://x"}, "FANOUT_REDIS_URL"),
        (
            {"FANOUT_MODE": "aws", "AWS_REGION": "us-east-1", "FANOUT_STORE": "redis"},
            "FANOUT_REDIS_URL",
        ),
        (
            {"FANOUT_MODE": "aws", "AWS_REGION": "us-east-1", "FANOUT_TOKEN_MODE": "self-signed"},
            "FANOUT_SIGNING_KEY_FILE",
        ),
    ],
)
def test_allocator_rejects_bad_values_naming_the_variable(environ: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        read_allocator(environ)


def test_defaults_are_the_designs() -> None:
    allocator = read_allocator({})
    stagemanager = read_stagemanager({})
    # One broadcaster reaches the region's 20,000 subscriptions: 1 origin and 5 replicas of 4,000.
    assert allocator.placement.limits == stagemanager.rooms.limits == stagemanager.autoscaler.limits
    limits = allocator.placement.limits
    assert (limits.direct_stages, limits.replicas_per_origin) == (1, 5)
    assert limits.soft_capacity * limits.topology_stages >= limits.region_subscription_quota == 20_000
    assert allocator.placement.hard_limit == 10_000
    assert allocator.placement.lease_seconds == 60
    assert allocator.self_signed and allocator.signing_key_file is not None
    assert stagemanager.rooms.min_stages == 1
    assert stagemanager.rooms.cluster_id == "local"


@pytest.mark.parametrize("read", [read_allocator, read_stagemanager, read_monitor])
def test_every_service_serves_metrics_where_fanout_metrics_host_says(read: Any) -> None:
    # All interfaces unless told: Prometheus scrapes a pod by its IP.
    assert read({}).metrics_host == "0.0.0.0"
    assert read({"FANOUT_METRICS_HOST": "127.0.0.1"}).metrics_host == "127.0.0.1"
    assert read({"FANOUT_METRICS_HOST": "::1"}).metrics_host == "::1"
    with pytest.raises(ConfigError, match="FANOUT_METRICS_HOST"):
        read({"FANOUT_METRICS_HOST": "127.0.0.1 ; rm"})


def test_the_stage_manager_shares_its_state_only_when_told() -> None:
    assert read_stagemanager({}).shared is None  # one replica, memory
    shared = read_stagemanager(
        {"FANOUT_STAGEMANAGER_STORE": "redis", "FANOUT_STAGEMANAGER_LISTEN": "0.0.0.0:50061"}
    ).shared
    assert shared is not None and shared.redis_url == "redis://127.0.0.1:6379/0"
    # Other replicas must reach it: by default where it listens, in Kubernetes its pod IP.
    assert shared.advertise_address == "0.0.0.0:50061" and shared.lease_seconds == 6.0


def test_mode_is_local_unless_a_region_is_configured() -> None:
    assert read_mode({}) == "local"
    assert read_mode({"AWS_REGION": "eu-west-1"}) == "aws"
    assert read_mode({"AWS_DEFAULT_REGION": "eu-west-1", "FANOUT_MODE": "local"}) == "local"
    local = read_ivs_settings({})
    assert local.endpoint_url == "http://127.0.0.1:8099" and local.local_credentials
    aws = read_ivs_settings({"AWS_REGION": "eu-west-1"})
    assert aws.endpoint_url is None and not aws.local_credentials and aws.region == "eu-west-1"


def test_aws_mode_without_a_signing_key_falls_back_to_the_token_api() -> None:
    settings = read_allocator({"AWS_REGION": "us-west-2"})
    assert not settings.self_signed and settings.signing_key_file is None


def test_the_redis_store_defaults_to_the_local_redis_and_the_cluster_namespace() -> None:
    settings = read_allocator({"FANOUT_STORE": "redis", "FANOUT_CLUSTER_ID": "blue"})
    assert settings.store == "redis"
    assert settings.redis_url == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"FANOUT_HTTP_HEADER_TIMEOUT_SECONDS": "0"}, "FANOUT_HTTP_HEADER_TIMEOUT_SECONDS"),
        ({"FANOUT_HTTP_HEADER_TIMEOUT_SECONDS": "soon"}, "FANOUT_HTTP_HEADER_TIMEOUT_SECONDS"),
        ({"FANOUT_HTTP_HEADER_TIMEOUT_SECONDS": "nan"}, "FANOUT_HTTP_HEADER_TIMEOUT_SECONDS"),
        ({"FANOUT_HTTP_BODY_TIMEOUT_SECONDS": "-1"}, "FANOUT_HTTP_BODY_TIMEOUT_SECONDS"),
        ({"FANOUT_HTTP_BODY_TIMEOUT_SECONDS": "inf"}, "FANOUT_HTTP_BODY_TIMEOUT_SECONDS"),
        ({"FANOUT_HTTP_IDLE_SECONDS": "0"}, "FANOUT_HTTP_IDLE_SECONDS"),
        ({"FANOUT_HTTP_IDLE_SECONDS": "99999"}, "FANOUT_HTTP_IDLE_SECONDS"),
        # The idle timer also runs while headers arrive: shorter, it would cut the header timeout.
        (
            {"FANOUT_HTTP_IDLE_SECONDS": "5", "FANOUT_HTTP_HEADER_TIMEOUT_SECONDS": "10"},
            "FANOUT_HTTP_IDLE_SECONDS",
        ),
        ({"FANOUT_HTTP_IDLE_SECONDS": "5"}, "FANOUT_HTTP_IDLE_SECONDS"),
        ({"FANOUT_HTTP_MAX_CONNECTIONS": "0"}, "FANOUT_HTTP_MAX_CONNECTIONS"),
        ({"FANOUT_HTTP_MAX_CONNECTIONS": "1.5"}, "FANOUT_HTTP_MAX_CONNECTIONS"),
        ({"FANOUT_HTTP_MAX_CONNECTIONS": "many"}, "FANOUT_HTTP_MAX_CONNECTIONS"),
        ({"FANOUT_GATEWAY_WORKERS": "0"}, "FANOUT_GATEWAY_WORKERS"),
        ({"FANOUT_GATEWAY_WORKERS": "some"}, "FANOUT_GATEWAY_WORKERS"),
        # Port 0 would give every worker a port of its own.
        ({"FANOUT_GATEWAY_WORKERS": "2", "FANOUT_GATEWAY_PORT": "0"}, "FANOUT_GATEWAY_WORKERS"),
    ],
)
def test_gateway_rejects_bad_http_limits_naming_the_variable(environ: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        GatewaySettings.from_env(environ)


def test_gateway_http_limits_default_for_production_and_read_overrides() -> None:
    defaults = GatewaySettings.from_env({})
    assert defaults.http_header_timeout_seconds == 10.0
    assert defaults.http_body_timeout_seconds == 10.0
    # Above the 60 s idle timeout of common proxies, and the watch page's heartbeat interval.
    assert defaults.http_idle_seconds == 75.0 > 60 > defaults.heartbeat_seconds
    assert defaults.http_max_connections == 10_000

    tuned = GatewaySettings.from_env(
        {
            "FANOUT_HTTP_HEADER_TIMEOUT_SECONDS": "2.5",
            "FANOUT_HTTP_BODY_TIMEOUT_SECONDS": "3",
            "FANOUT_HTTP_IDLE_SECONDS": "2.5",
            "FANOUT_HTTP_MAX_CONNECTIONS": "50",
        }
    )
    assert tuned.http_header_timeout_seconds == 2.5
    assert tuned.http_body_timeout_seconds == 3.0
    assert tuned.http_idle_seconds == 2.5
    assert tuned.http_max_connections == 50


_TICKET_SECRET = "host-app-ticket-secret-0123456789abcdef"


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"FANOUT_VIEWER_AUTH": "tickets"}, "FANOUT_VIEWER_AUTH"),
        ({"FANOUT_VIEWER_AUTH": "jwt"}, "FANOUT_VIEWER_AUTH"),
        ({"FANOUT_TICKET_SECRET": "short"}, "FANOUT_TICKET_SECRET"),
        ({"FANOUT_TICKET_JWKS_URL": "file:///etc/passwd"}, "FANOUT_TICKET_JWKS_URL"),
        ({"FANOUT_TICKET_JWKS_FILE": "/nonexistent/jwks.json"}, "FANOUT_TICKET_JWKS_FILE"),
        (
            {"FANOUT_TICKET_SECRET": _TICKET_SECRET, "FANOUT_TICKET_JWKS_URL": "https://host.example/jwks"},
            "FANOUT_TICKET_JWKS_URL",
        ),
        ({"FANOUT_TICKET_LEEWAY_SECONDS": "3600"}, "FANOUT_TICKET_LEEWAY_SECONDS"),
        ({"FANOUT_TICKET_JWKS_MIN_REFETCH_SECONDS": "0"}, "FANOUT_TICKET_JWKS_MIN_REFETCH_SECONDS"),
        ({"FANOUT_TICKET_JWKS_CACHE_SECONDS": "soon"}, "FANOUT_TICKET_JWKS_CACHE_SECONDS"),
    ],
)
def test_gateway_rejects_bad_admission_settings_naming_the_variable(
    environ: dict[str, str], variable: str
) -> None:
    with pytest.raises(ConfigError, match=variable):
        GatewaySettings.from_env(environ)


def test_a_short_ticket_secret_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as raised:
        GatewaySettings.from_env({"FANOUT_TICKET_SECRET": "tooshort-secret"})
    assert "tooshort-secret" not in str(raised.value)


def test_a_jwks_file_without_usable_keys_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text('{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}]}')
    with pytest.raises(ConfigError, match="FANOUT_TICKET_JWKS_FILE"):
        GatewaySettings.from_env({"FANOUT_TICKET_JWKS_FILE": str(path)})


def test_admission_is_open_by_default_and_jwt_mode_reads_its_key_source() -> None:
    defaults = GatewaySettings.from_env({})
    assert (defaults.viewer_auth, defaults.ticket_secret, defaults.ticket_jwks_url) == ("open", "", None)
    settings = GatewaySettings.from_env(
        {
            "FANOUT_VIEWER_AUTH": "jwt",
            "FANOUT_TICKET_SECRET": _TICKET_SECRET,
            "FANOUT_TICKET_ISSUER": "https://host.example",
            "FANOUT_TICKET_AUDIENCE": "fanout",
        }
    )
    assert settings.viewer_auth == "jwt"
    assert (settings.ticket_issuer, settings.ticket_audience) == ("https://host.example", "fanout")
    assert settings.ticket_leeway_seconds == 30
    assert _TICKET_SECRET not in repr(settings)


def test_publisher_keys_never_show_in_the_settings_repr() -> None:
    key = "publisher-key-0123456789abcdef"
    settings = GatewaySettings.from_env({"FANOUT_PUBLISHER_KEYS": key})
    assert settings.publisher_keys == (key,)
    assert key not in repr(settings)


def test_gateway_serves_in_one_process_unless_told_and_auto_means_one_worker_per_cpu() -> None:
    assert GatewaySettings.from_env({}).workers == 1
    assert GatewaySettings.from_env({"FANOUT_GATEWAY_WORKERS": "3"}).workers == 3
    auto = GatewaySettings.from_env({"FANOUT_GATEWAY_WORKERS": "auto"})
    assert auto.workers == len(os.sched_getaffinity(0))
