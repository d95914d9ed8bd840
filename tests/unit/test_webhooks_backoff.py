"""Failed deliveries are retried with exponential backoff and jitter, and given up at a bounded time."""

from __future__ import annotations

import random

from services.webhooks.backoff import RetryPolicy

POLICY = RetryPolicy(base_seconds=1.0, max_seconds=60.0, give_up_seconds=3600.0)


def test_each_delay_doubles_between_half_and_all_of_its_step() -> None:
    for failures, step in [(1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0)]:
        assert POLICY.delay(failures, rand=lambda: 0.0) == step / 2
        assert POLICY.delay(failures, rand=lambda: 1.0) == step


def test_delays_stop_growing_at_the_cap_even_after_very_many_failures() -> None:
    assert POLICY.delay(7, rand=lambda: 1.0) == 60.0
    assert POLICY.delay(10_000, rand=lambda: 1.0) == 60.0
    assert POLICY.delay(10_000, rand=lambda: 0.0) == 30.0


def test_jitter_spreads_endpoints_that_failed_together() -> None:
    rand = random.Random(7).random
    delays = {round(POLICY.delay(5, rand), 6) for _ in range(50)}
    assert len(delays) > 40
    assert all(8.0 <= delay <= 16.0 for delay in delays)


def test_retries_end_at_the_give_up_time_with_one_last_attempt_there() -> None:
    created = 1_000.0
    assert POLICY.next_attempt(created, created + 1, 1, rand=lambda: 1.0) == created + 2
    # A long delay is cut to the deadline: the last attempt is made at the give-up time.
    assert POLICY.next_attempt(created, created + 3590, 12, rand=lambda: 1.0) == created + 3600
    assert POLICY.next_attempt(created, created + 3600, 13, rand=lambda: 1.0) is None
    assert POLICY.next_attempt(created, created + 9999, 1, rand=lambda: 1.0) is None


def test_a_whole_schedule_attempts_about_log2_times_and_gives_up_on_time() -> None:
    policy = RetryPolicy(base_seconds=1.0, max_seconds=600.0, give_up_seconds=3600.0)
    rand = random.Random(1).random
    created = now = 0.0
    failures = 0
    while True:
        failures += 1
        at = policy.next_attempt(created, now, failures, rand)
        if at is None:
            break
        assert at > now
        now = at
    assert now == 3600.0
    assert 12 <= failures <= 20
