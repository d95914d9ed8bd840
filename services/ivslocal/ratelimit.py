"""Per-operation call rates of ivs-realtime (ivs-facts §3) as token buckets, and call counters."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from services.common.ivs_quotas import OPERATION_RATES


@dataclass
class _Bucket:
    rate: float
    tokens: float
    updated: float


class RateLimiter:
    """One token bucket per operation, as deep as one second of its rate (at least one call)."""

    def __init__(
        self, rates: Mapping[str, float] = OPERATION_RATES, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rates = dict(rates)
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def allow(self, operation: str) -> bool:
        """Takes one token for `operation`; False means the call is throttled. Unlisted operations pass."""
        rate = self._rates.get(operation)
        if rate is None:
            return True
        now = self._clock()
        bucket = self._buckets.get(operation)
        if bucket is None:
            bucket = self._buckets[operation] = _Bucket(rate=rate, tokens=max(1.0, rate), updated=now)
        # A rate under 1/s still allows one call per 1/rate seconds, never none at all.
        bucket.tokens = min(max(1.0, bucket.rate), bucket.tokens + (now - bucket.updated) * bucket.rate)
        bucket.updated = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True


@dataclass
class CallStats:
    """What the emulator was asked: calls and throttles per operation, errors per (operation, code)."""

    calls: Counter[str] = field(default_factory=Counter)
    throttles: Counter[str] = field(default_factory=Counter)
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        errors: dict[str, dict[str, int]] = {}
        for (operation, code), count in self.errors.items():
            errors.setdefault(operation, {})[code] = count
        return {"calls": dict(self.calls), "throttles": dict(self.throttles), "errors": errors}
