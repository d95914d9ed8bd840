"""Calls to the ivs-realtime API: off the event loop, within the per-operation budget, counted."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from prometheus_client import CollectorRegistry, Counter, Histogram

from services.common.ivs_quotas import OPERATION_RATES
from services.common.timeouts import IVS_CONNECT_SECONDS, IVS_READ_SECONDS

log = logging.getLogger(__name__)

DEFAULT_TPS = 5.0


def make_ivs_client(
    region: str,
    endpoint_url: str | None,
    local_credentials: bool,
    service: Literal["ivs-realtime", "ivs"] = "ivs-realtime",
) -> Any:
    """A boto3 ivs-realtime client (or `ivs`, the low-latency channels' service). Retries are ours
    (IvsCaller), so botocore must not hide throttles."""
    config = Config(
        retries={"total_max_attempts": 1, "mode": "standard"},
        max_pool_connections=16,
        connect_timeout=IVS_CONNECT_SECONDS,
        read_timeout=IVS_READ_SECONDS,
    )
    kwargs: dict[str, Any] = {"region_name": region, "config": config}
    if endpoint_url:
        kwargs["endpoint_url"] = endpoint_url
    if local_credentials:
        # The emulator (and moto) accept any signature; real AWS uses the normal credential chain.
        kwargs["aws_access_key_id"] = "local"
        kwargs["aws_secret_access_key"] = "local"  # noqa: S105 - not a secret: the emulator's dummy
    return boto3.session.Session().client(service, **kwargs)


class CallBudget:
    """Spaces calls of each operation evenly so no one-second window exceeds its TPS budget."""

    def __init__(self, tps: Mapping[str, float] | None = None, default_tps: float = DEFAULT_TPS) -> None:
        self._tps = dict(OPERATION_RATES if tps is None else tps)
        self._default_tps = default_tps
        self._next_slot: dict[str, float] = {}
        self._clock = time.monotonic

    def interval(self, operation: str) -> float:
        tps = self._tps.get(operation, self._default_tps)
        return 0.0 if tps <= 0 else 1.0 / tps

    async def acquire(self, operation: str) -> None:
        now = self._clock()
        slot = max(now, self._next_slot.get(operation, now))
        self._next_slot[operation] = slot + self.interval(operation)
        if slot > now:
            await asyncio.sleep(slot - now)


class IvsMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Counter(
            "fanout_ivs_calls",
            "Calls to the IVS API by operation and outcome (ok, throttled, quota, not_found, error).",
            ["operation", "outcome"],
            registry=registry,
        )
        self.latency = Histogram(
            "fanout_ivs_call_duration_seconds",
            "Latency of IVS API calls by operation.",
            ["operation"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=registry,
        )


def error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _outcome(error: Exception) -> str:
    if isinstance(error, ClientError):
        code = error_code(error)
        if code in ("ThrottlingException", "TooManyRequestsException"):
            return "throttled"
        if code == "ServiceQuotaExceededException":
            return "quota"
        if code == "ResourceNotFoundException":
            return "not_found"
    return "error"


class IvsCaller:
    """Runs blocking boto3 calls in a bounded pool, within the budget, retrying throttles with backoff."""

    def __init__(
        self,
        client: Any,
        budget: CallBudget,
        metrics: IvsMetrics | None,
        max_workers: int = 8,
        throttle_retries: int = 5,
        guard: Callable[[str], None] | None = None,
    ) -> None:
        self._client = client
        # Runs right before each call goes out (after any wait for the budget): may refuse it by
        # raising, e.g. a stage manager that no longer leads (services/stagemanager/leadership.py).
        self._guard = guard
        if guard is not None:
            # Again in the worker thread, once the request is signed and about to be sent: a process
            # paused (SIGSTOP, a long GC) after the first check would otherwise send it when it wakes.
            client.meta.events.register("before-send", self._guard_before_send)
        self._budget = budget
        self._metrics = metrics
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="ivs")
        self._throttle_retries = throttle_retries

    async def call(self, operation: str, **params: Any) -> Any:
        """Calls client.<snake_case operation>(**params); ClientError propagates after counting."""
        fn = getattr(self._client, _snake(operation))
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            await self._budget.acquire(operation)
            if self._guard is not None:
                self._guard(operation)
            started = time.perf_counter()
            try:
                result = await loop.run_in_executor(self._pool, lambda: fn(**params))
            except (ClientError, BotoCoreError) as error:
                outcome = _outcome(error)
                self._count(operation, outcome, started)
                if outcome == "throttled" and attempt < self._throttle_retries:
                    attempt += 1
                    delay = min(5.0, 0.2 * 2**attempt) * (0.5 + random.random() / 2)
                    log.warning("IVS throttled %s; retry %d in %.2fs", operation, attempt, delay)
                    await asyncio.sleep(delay)
                    continue
                raise
            self._count(operation, "ok", started)
            return result

    def _guard_before_send(self, event_name: str, **_: Any) -> None:
        assert self._guard is not None
        # before-send.<service>.<Operation>
        self._guard(event_name.rsplit(".", 1)[-1])

    def _count(self, operation: str, outcome: str, started: float) -> None:
        if self._metrics is not None:
            self._metrics.calls.labels(operation, outcome).inc()
            self._metrics.latency.labels(operation).observe(time.perf_counter() - started)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _snake(name: str) -> str:
    out = []
    for i, char in enumerate(name):
        if char.isupper() and i:
            out.append("_")
        out.append(char.lower())
    return "".join(out)
