"""Delivers the outbox to every endpoint: one loop per endpoint, so a slow or dead one delays only
its own deliveries; failures are retried with backoff (backoff.py) until the give-up time."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable, Sequence

import aiohttp

from services.common.errors import Unavailable
from services.webhooks.backoff import RetryPolicy
from services.webhooks.metrics import WebhookMetrics
from services.webhooks.outbox import Delivery, Outbox
from services.webhooks.settings import Endpoint
from services.webhooks.signer import WebhookSigner

log = logging.getLogger(__name__)

USER_AGENT = "ivs-fanout-webhooks"
# Deliveries one endpoint takes at once (each room's in order, rooms side by side).
BATCH = 16
# An idle endpoint looks for work made by another process (or retries come due) at least this often.
POLL_SECONDS = 1.0
# A claimed delivery is hidden from other claims for the attempt's timeout plus this margin.
LEASE_MARGIN_SECONDS = 5.0
OUTBOX_RETRY_SECONDS = (0.5, 10.0)


class Dispatcher:
    def __init__(
        self,
        outbox: Outbox,
        endpoints: Sequence[Endpoint],
        signer: WebhookSigner,
        policy: RetryPolicy,
        metrics: WebhookMetrics,
        timeout_seconds: float,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._outbox = outbox
        self._endpoints = list(endpoints)
        self._signer = signer
        self._policy = policy
        self._metrics = metrics
        self._timeout = timeout_seconds
        self._clock = clock
        self._rand = rand
        self._wakers = {endpoint.key: asyncio.Event() for endpoint in self._endpoints}

    def wake(self) -> None:
        """Something was recorded: look now rather than at the next poll."""
        for waker in self._wakers.values():
            waker.set()

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        async with (
            aiohttp.ClientSession(timeout=timeout, headers={"User-Agent": USER_AGENT}) as http,
            asyncio.TaskGroup() as group,
        ):
            for endpoint in self._endpoints:
                group.create_task(self._serve(http, endpoint))

    async def _serve(self, http: aiohttp.ClientSession, endpoint: Endpoint) -> None:
        waker = self._wakers[endpoint.key]
        failing = _Failing(endpoint)
        outbox_delay = OUTBOX_RETRY_SECONDS[0]
        outbox_down = False
        while True:
            waker.clear()
            wait = POLL_SECONDS
            try:
                now = self._clock()
                lease = now + self._timeout + LEASE_MARGIN_SECONDS
                claimed = await self._outbox.claim(endpoint.key, now, BATCH, lease)
                await asyncio.gather(
                    *(
                        self._attempt_in_order(http, endpoint, chain, lease, failing)
                        for chain in by_room(claimed)
                    )
                )
                now = self._clock()
                backlog = await self._outbox.backlog(endpoint.key)
                self._metrics.report_backlog(endpoint, backlog, now)
                if claimed:
                    continue
                if backlog.next_due_at is not None:
                    wait = min(wait, max(0.0, backlog.next_due_at - now))
                if outbox_down:
                    log.info("webhook outbox reachable again (endpoint %s)", endpoint.label)
                    outbox_down, outbox_delay = False, OUTBOX_RETRY_SECONDS[0]
            except Unavailable as error:
                if not outbox_down:
                    log.warning("webhooks to %s wait: %s", endpoint.label, error.message)
                outbox_down = True
                wait = outbox_delay
                outbox_delay = min(outbox_delay * 2, OUTBOX_RETRY_SECONDS[1])
            except Exception:
                log.exception("webhook dispatch to %s failed", endpoint.label)
                wait = OUTBOX_RETRY_SECONDS[1]
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation that
            # arrives as the waker is set, and the dispatcher would never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await waker.wait()

    async def _attempt_in_order(
        self,
        http: aiohttp.ClientSession,
        endpoint: Endpoint,
        chain: list[Delivery],
        lease: float,
        failing: _Failing,
    ) -> None:
        for position, delivery in enumerate(chain):
            # The claim covers one attempt: each later one extends it first, unless another
            # dispatcher took the delivery over meanwhile (then it is theirs).
            renewed = self._clock() + self._timeout + LEASE_MARGIN_SECONDS
            try:
                if position and not await self._outbox.renew(endpoint.key, delivery.event_id, lease, renewed):
                    continue
            except Unavailable:
                return
            await self._attempt(http, endpoint, delivery, failing)

    async def _attempt(
        self, http: aiohttp.ClientSession, endpoint: Endpoint, delivery: Delivery, failing: _Failing
    ) -> None:
        problem = await self._post(http, endpoint, delivery)
        try:
            if problem is None:
                if await self._outbox.finish(endpoint.key, delivery.event_id):
                    self._metrics.deliveries.labels(endpoint.label, "delivered").inc()
                failing.recovered()
                return
            failing.failed(problem)
            failures = delivery.attempts + 1
            at = self._policy.next_attempt(delivery.created_at, self._clock(), failures, self._rand)
            if at is not None:
                await self._outbox.retry(endpoint.key, delivery.event_id, at)
                self._metrics.deliveries.labels(endpoint.label, "retried").inc()
                return
            if await self._outbox.finish(endpoint.key, delivery.event_id):
                self._metrics.deliveries.labels(endpoint.label, "failed").inc()
                log.warning(
                    "webhook %s to %s given up after %d attempts (%s)",
                    delivery.event_id, endpoint.label, failures, problem,
                )  # fmt: skip
        except Unavailable as error:
            # The claim runs out and the delivery comes due again: at least once, maybe twice.
            log.warning(
                "webhook %s to %s: outcome not recorded: %s", delivery.event_id, endpoint.label, error.message
            )

    async def _post(self, http: aiohttp.ClientSession, endpoint: Endpoint, delivery: Delivery) -> str | None:
        """None when the endpoint accepted the event (2xx), else why not. Never the URL: it may
        carry credentials."""
        headers = self._signer.headers(delivery.event_id, delivery.body, self._clock())
        try:
            async with http.post(
                endpoint.url, data=delivery.body.encode(), headers=headers, allow_redirects=False
            ) as response:
                if 200 <= response.status < 300:
                    return None
                return f"HTTP {response.status}"
        except TimeoutError:
            return f"no answer within {self._timeout:g} s"
        except aiohttp.ClientError as error:
            return type(error).__name__


def by_room(deliveries: list[Delivery]) -> list[list[Delivery]]:
    """Deliveries grouped by room, each group in the order given: one room's events go one after the
    other (the host app sees them in order unless a retry reorders them), rooms side by side."""
    chains: dict[str, list[Delivery]] = {}
    for delivery in deliveries:
        room = json.loads(delivery.body).get("data", {}).get("room", "")
        chains.setdefault(room, []).append(delivery)
    return list(chains.values())


class _Failing:
    """Says once that an endpoint started failing, and once that it recovered, not per delivery."""

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        self._failing = False

    def failed(self, problem: str) -> None:
        if not self._failing:
            log.warning(
                "webhook endpoint %s failing (%s); retrying with backoff", self._endpoint.label, problem
            )
        self._failing = True

    def recovered(self) -> None:
        if self._failing:
            log.info("webhook endpoint %s accepts deliveries again", self._endpoint.label)
        self._failing = False
