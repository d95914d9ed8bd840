"""The bench's wrk closed loop: every request a new viewer, and its figures read back right.

A real wrk process against a small aiohttp server on loopback that records each body and refuses
every fifth viewer with a 503, so the test knows exactly what wrk sent and what it should report.
"""

from __future__ import annotations

import pytest

from tests.integration.viewer_endpoint import recording_server
from tools.loadgen import ClosedLoopJob
from tools.wrk_load import WrkClosedLoop, WrkError, parse_report


async def test_every_request_is_a_new_viewer_and_refusals_are_counted_as_errors() -> None:
    seen: list[tuple[str, str]] = []
    wrk = WrkClosedLoop()
    try:
        async with recording_server(seen) as url:
            figures, cpu_seconds, requests = await wrk.run(ClosedLoopJob(url, 4, 1.0, 1.0, "c4-test"))
    finally:
        wrk.close()
    users = [user for _, user in seen]
    assert len(users) >= requests > 0
    assert len(set(users)) == len(users), "a userId was sent twice"
    assert {content_type for content_type, _ in seen} == {"application/json"}
    # Warm-up and measured runs have prefixes of their own, so neither repeats the other's viewers.
    assert any(user.startswith("c4-test-w-") for user in users)
    assert any(user.startswith("c4-test-") and not user.startswith("c4-test-w-") for user in users)
    # Every fifth answer was a 503: wrk counts them apart from the answered ones.
    refused = figures.errors["non-2xx"]
    assert refused > 0
    assert abs(refused - figures.requests / 5) <= 5
    assert figures.answered == figures.requests - refused
    assert 0 < figures.p50_ms <= figures.p90_ms <= figures.p99_ms
    assert 0.9 <= figures.seconds <= 2.0
    assert cpu_seconds > 0


def test_a_report_without_the_script_figures_is_an_error_that_quotes_wrk() -> None:
    with pytest.raises(WrkError, match=r"printed no figures.*unable to connect"):
        parse_report("Running 1s test @ http://127.0.0.1:1/\n  unable to connect to 127.0.0.1:1\n")


def test_connection_errors_are_named() -> None:
    report = parse_report(
        'FANOUT_WRK {"requests":10,"duration_us":1000000,"connect":3,"read":0,"write":0,'
        '"status":2,"timeout":1,"p50_us":1500,"p90_us":2500,"p99_us":9000}'
    )
    assert report.errors == {"wrk connect": 3, "wrk timeout": 1, "non-2xx": 2}
    assert (report.answered, report.p50_ms, report.p99_ms) == (8, 1.5, 9.0)
