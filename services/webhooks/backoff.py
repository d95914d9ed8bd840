"""When a failed delivery is tried again: exponential backoff with jitter, until a bounded time."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

# 2**60 times any sane base is past every cap: the exponent stops growing there (no float overflow).
_MAX_EXPONENT = 60


@dataclass(frozen=True)
class RetryPolicy:
    base_seconds: float = 1.0
    max_seconds: float = 600.0
    give_up_seconds: float = 3600.0

    def delay(self, failures: int, rand: Callable[[], float] = random.random) -> float:
        """After the n-th failure: between half and all of min(max, base x 2^(n-1)). The jitter keeps
        endpoints that failed together (an outage) from being retried together."""
        step = min(self.max_seconds, self.base_seconds * 2 ** min(max(failures - 1, 0), _MAX_EXPONENT))
        return step / 2 + step / 2 * rand()

    def next_attempt(
        self, created_at: float, failed_at: float, failures: int, rand: Callable[[], float] = random.random
    ) -> float | None:
        """When to try again after the n-th failure of an event made at `created_at`, or None to give
        up. The last attempt is made at the give-up time itself, not skipped for a long delay."""
        deadline = created_at + self.give_up_seconds
        if failed_at >= deadline:
            return None
        return min(failed_at + self.delay(failures, rand), deadline)
