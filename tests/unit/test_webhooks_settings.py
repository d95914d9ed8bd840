"""Webhook settings are validated at start: a bad value names its variable and never repeats a secret."""

from __future__ import annotations

import base64

import pytest

from services.common.env import ConfigError
from services.webhooks.settings import read_webhook_settings

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
URL = "https://hooks.example.com/fanout"


def test_no_urls_means_no_webhooks() -> None:
    settings = read_webhook_settings({})
    assert not settings.enabled
    assert settings.give_up_seconds == 3600
    assert settings.viewers_summary_seconds == 60


def test_urls_with_a_secret() -> None:
    settings = read_webhook_settings(
        {
            "FANOUT_WEBHOOK_URLS": f"{URL}, http://user:pass@10.0.0.5:8080/hook?token=abc",
            "FANOUT_WEBHOOK_SECRET": SECRET,
            "FANOUT_WEBHOOK_GIVE_UP_SECONDS": "600",
            "FANOUT_STAGEMANAGER_STORE": "redis",
            "FANOUT_CLUSTER_ID": "prod-1",
        }
    )
    assert settings.enabled
    assert [endpoint.url for endpoint in settings.endpoints] == [
        URL,
        "http://user:pass@10.0.0.5:8080/hook?token=abc",
    ]
    # Logs and metrics name the host only: no credentials, path or query.
    assert [endpoint.label for endpoint in settings.endpoints] == ["hooks.example.com", "10.0.0.5:8080"]
    assert "pass" not in repr(settings) and SECRET not in repr(settings)
    assert settings.store == "redis" and settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.namespace == "prod-1"
    assert settings.give_up_seconds == 600


def test_two_urls_on_one_host_keep_apart_and_keys_are_stable() -> None:
    environ = {
        "FANOUT_WEBHOOK_URLS": "https://h.example/a,https://h.example/b",
        "FANOUT_WEBHOOK_SECRET": SECRET,
    }
    first = read_webhook_settings(environ).endpoints
    assert [e.label for e in first] == ["h.example", "h.example#2"]
    assert first[0].key != first[1].key
    assert [e.key for e in read_webhook_settings(environ).endpoints] == [e.key for e in first]


def test_the_outbox_follows_the_stage_managers_store_unless_told_otherwise() -> None:
    environ = {"FANOUT_WEBHOOK_URLS": URL, "FANOUT_WEBHOOK_SECRET": SECRET}
    assert read_webhook_settings(environ).store == "memory"
    # The allocator's lease store is not the stage manager's.
    assert read_webhook_settings({**environ, "FANOUT_STORE": "redis"}).store == "memory"
    assert read_webhook_settings({**environ, "FANOUT_WEBHOOK_STORE": "redis"}).store == "redis"
    shared = {**environ, "FANOUT_STAGEMANAGER_STORE": "redis"}
    assert read_webhook_settings(shared).store == "redis"
    assert read_webhook_settings({**shared, "FANOUT_WEBHOOK_STORE": "memory"}).redis_url is None


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"FANOUT_WEBHOOK_URLS": URL}, "FANOUT_WEBHOOK_SECRET"),
        ({"FANOUT_WEBHOOK_URLS": URL, "FANOUT_WEBHOOK_SECRET": "not-a-whsec"}, "FANOUT_WEBHOOK_SECRET"),
        ({"FANOUT_WEBHOOK_URLS": URL, "FANOUT_WEBHOOK_SECRET": "whsec_%%%%"}, "FANOUT_WEBHOOK_SECRET"),
        # Too short to be a key.
        ({"FANOUT_WEBHOOK_URLS": URL, "FANOUT_WEBHOOK_SECRET": "whsec_c2hvcnQ="}, "FANOUT_WEBHOOK_SECRET"),
        ({"FANOUT_WEBHOOK_URLS": "ftp://x.example/", "FANOUT_WEBHOOK_SECRET": SECRET}, "FANOUT_WEBHOOK_URLS"),
        (
            {"FANOUT_WEBHOOK_URLS": "hooks.example.com", "FANOUT_WEBHOOK_SECRET": SECRET},
            "FANOUT_WEBHOOK_URLS",
        ),
        ({"FANOUT_WEBHOOK_URLS": "http://h:99999/", "FANOUT_WEBHOOK_SECRET": SECRET}, "FANOUT_WEBHOOK_URLS"),
        ({"FANOUT_WEBHOOK_URLS": f"{URL},{URL}", "FANOUT_WEBHOOK_SECRET": SECRET}, "FANOUT_WEBHOOK_URLS"),
        ({"FANOUT_WEBHOOK_GIVE_UP_SECONDS": "0"}, "FANOUT_WEBHOOK_GIVE_UP_SECONDS"),
        ({"FANOUT_WEBHOOK_TIMEOUT_SECONDS": "soon"}, "FANOUT_WEBHOOK_TIMEOUT_SECONDS"),
        (
            {"FANOUT_WEBHOOK_GIVE_UP_SECONDS": "5", "FANOUT_WEBHOOK_TIMEOUT_SECONDS": "10"},
            "FANOUT_WEBHOOK_TIMEOUT_SECONDS",
        ),
        ({"FANOUT_WEBHOOK_VIEWERS_SUMMARY_SECONDS": "-1"}, "FANOUT_WEBHOOK_VIEWERS_SUMMARY_SECONDS"),
        ({"FANOUT_WEBHOOK_STORE": "disk"}, "FANOUT_WEBHOOK_STORE"),
        (
            {
                "FANOUT_MODE": "aws",
                "AWS_REGION": "us-east-1",
                "FANOUT_WEBHOOK_STORE": "redis",
                "FANOUT_WEBHOOK_URLS": URL,
                "FANOUT_WEBHOOK_SECRET": SECRET,
            },
            "FANOUT_REDIS_URL",
        ),
    ],
)
def test_bad_values_name_their_variable(environ: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable) as raised:
        read_webhook_settings(environ)
    message = str(raised.value)
    for secret in ("not-a-whsec", "whsec_%%%%", "c2hvcnQ=", SECRET, "hooks.example.com", "x.example"):
        assert secret not in message
