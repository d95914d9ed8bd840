"""The bench's Python load generator: every request a new viewer, each answer counted once, failures
by name; the open loop on a fixed schedule, the closed loop (wrk's fallback) one request per user.

The generator runs in its own process, as in `make bench`, against a stand-in endpoint on loopback.
"""

from __future__ import annotations

import json

from aiohttp import web

from tests.integration.viewer_endpoint import recording_server
from tests.ports import free_port
from tools.loadgen import ClosedLoopJob, LoadGenerator, LoadResult, OpenLoopJob

RATE = 400.0
WARMUP, SECONDS = 0.5, 1.0


async def run_job(job: OpenLoopJob | ClosedLoopJob) -> LoadResult:
    """The job in a generator process of its own, as `make bench` runs it."""
    generator = LoadGenerator()
    try:
        return await generator.run(job)
    finally:
        generator.close()


async def test_every_scheduled_viewer_is_sent_once_and_answered_or_counted_as_an_error() -> None:
    seen: list[tuple[str, str]] = []
    async with recording_server(seen) as url:
        result = await run_job(OpenLoopJob(url, RATE, WARMUP, SECONDS, "o400-test"))

    scheduled = int((WARMUP + SECONDS) * RATE)
    users = [user for _, user in seen]
    assert sorted(users) == sorted(f"o400-test-{i}" for i in range(scheduled)), "a viewer lost or sent twice"
    assert {content_type for content_type, _ in seen} == {"application/json"}
    assert result.job_requests == scheduled
    # The measured window: what was sent in it was answered, a 200 timed and a 503 counted by its status.
    measured = scheduled - int(WARMUP * RATE)
    assert result.sent == measured
    assert len(result.latencies_ms) + sum(result.errors.values()) == measured
    assert set(result.errors) == {"503"}
    assert abs(result.errors["503"] - measured / 5) <= 2
    assert all(latency > 0 for latency in result.latencies_ms)
    assert 0 < result.max_in_flight < measured
    assert result.generator_cpu_seconds > 0


async def test_a_server_that_is_not_there_gives_named_errors_and_the_job_still_ends() -> None:
    url = f"http://127.0.0.1:{free_port()}/api/rooms/main/viewer-token"
    result = await run_job(OpenLoopJob(url, 100.0, 0.2, 0.5, "o100-test"))
    assert not result.latencies_ms
    assert set(result.errors) == {"ConnectionRefusedError"}
    assert result.errors["ConnectionRefusedError"] == result.sent == 50


async def test_a_server_that_closes_each_connection_after_its_answer_still_gets_every_viewer() -> None:
    users: list[str] = []

    async def viewer(request: web.Request) -> web.Response:
        users.append(json.loads(await request.read())["userId"])
        response = web.json_response({"token": "t"})
        response.force_close()  # "Connection: close": the generator must open a new connection
        return response

    app = web.Application()
    app.router.add_post("/viewer-token", viewer)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/viewer-token"
        result = await run_job(OpenLoopJob(url, 200.0, 0.2, 0.5, "o200-test"))
    finally:
        await runner.cleanup()
    assert sorted(users) == sorted(f"o200-test-{i}" for i in range(140))
    assert not result.errors
    assert len(result.latencies_ms) == result.sent == 100


async def test_the_closed_loop_keeps_one_request_per_user_and_counts_refusals() -> None:
    seen: list[tuple[str, str]] = []
    async with recording_server(seen) as url:
        result = await run_job(ClosedLoopJob(url, 4, 0.5, 1.0, "c4-test"))
    users = [user for _, user in seen]
    assert len(set(users)) == len(users) == result.job_requests > 0, "a viewer sent twice or lost"
    assert {content_type for content_type, _ in seen} == {"application/json"}
    # The measured window: every fifth answer was a 503, counted apart from the timed 200s.
    measured = len(result.latencies_ms) + sum(result.errors.values())
    assert set(result.errors) == {"503"}
    assert abs(result.errors["503"] - measured / 5) <= 4
    assert all(latency > 0 for latency in result.latencies_ms)
    assert result.generator_cpu_seconds > 0
