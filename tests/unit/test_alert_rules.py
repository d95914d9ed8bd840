"""The alert rules load in Prometheus, and each alert has a promtool unit test that makes it fire."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.prometheus_binaries import require_binary

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "components" / "monitoring"
RULES = MONITORING / "alerts.rules.yml"
TESTS = MONITORING / "alerts.test.yml"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_binary("promtool"), *args],
        cwd=MONITORING,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def alert_names() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}


def test_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in result.stdout


def test_every_alert_has_a_test_that_fires_it_and_one_that_does_not() -> None:
    cases = [case for test in yaml.safe_load(TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    fired = {case["alertname"] for case in cases if case["exp_alerts"]}
    quiet = {case["alertname"] for case in cases if not case["exp_alerts"]}
    assert fired == alert_names()
    assert quiet == alert_names()


def test_alert_unit_tests_pass() -> None:
    result = promtool("test", "rules", TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
