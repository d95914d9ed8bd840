"""The request pipeline: request ids and metrics, the JSON error shape, limits."""

from __future__ import annotations

import logging
import math
import re
import secrets
import time
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway.errors import ApiError, UpstreamError, api_error_from_grpc
from gateway.metrics import GatewayMetrics
from gateway.responses import json_response

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
REQUEST_ID_KEY = web.RequestKey("request_id", str)
_REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{8,64}")
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


_HTTP_CODES = {
    400: ("bad_request", "The request is malformed."),
    401: ("unauthorized", "Credentials are missing or wrong."),
    403: ("forbidden", "This is not allowed."),
    404: ("not_found", "There is nothing at this address."),
    405: ("method_not_allowed", "This method is not allowed here."),
    413: ("payload_too_large", "The request body is too large."),
    415: ("unsupported_media_type", "Send the body as JSON (Content-Type: application/json)."),
    429: ("rate_limited", "Too many requests; slow down."),
}
# Headers of aiohttp's own HTTP exceptions that still mean something on our JSON answer.
_KEPT_HEADERS = ("Allow", "Retry-After", "WWW-Authenticate")


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


def route_label(request: web.Request) -> str:
    """The route pattern (e.g. /api/rooms/{room}), never the raw path, so labels stay few."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _method_label(method: str) -> str:
    return method if method in _KNOWN_METHODS else "other"


def observe_middleware(metrics: GatewayMetrics) -> Middleware:
    """Outermost: request id in and out, request counters and latency, one log line per failure."""

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        incoming = request.headers.get(REQUEST_ID_HEADER, "")
        request_id = incoming if _REQUEST_ID_PATTERN.fullmatch(incoming) else secrets.token_hex(8)
        request[REQUEST_ID_KEY] = request_id
        started = time.perf_counter()
        response = await handler(request)
        elapsed = time.perf_counter() - started
        route, method = route_label(request), _method_label(request.method)
        metrics.http_requests.labels(route, method, str(response.status)).inc()
        metrics.http_duration.labels(route, method).observe(elapsed)
        if not response.prepared:
            response.headers[REQUEST_ID_HEADER] = request_id
        log.debug(
            "%s %s -> %d in %.1f ms",
            method,
            route,
            response.status,
            elapsed * 1000,
            extra={"request_id": request_id},
        )
        return response

    return observe


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as {"error": {"code", "message"}}; nothing unexpected leaks details."""
    try:
        return await handler(request)
    except ApiError as exc:
        response = error_response(exc.status, exc.code, exc.message, exc.headers)
        if exc.close_connection:
            response.force_close()
        return response
    except UpstreamError as exc:
        mapped = api_error_from_grpc(exc.error)
        if mapped is None:
            log.error(
                "%s.%s failed with %s",
                exc.dependency,
                exc.method,
                exc.error.code().name,
                exc_info=exc,
                extra={"request_id": request.get(REQUEST_ID_KEY)},
            )
            return _internal_error()
        if mapped.status >= 500:
            log.warning(
                "%s.%s failed with %s",
                exc.dependency,
                exc.method,
                exc.error.code().name,
                extra={"request_id": request.get(REQUEST_ID_KEY)},
            )
        return error_response(mapped.status, mapped.code, mapped.message, mapped.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code, message = _HTTP_CODES.get(exc.status, (f"http_{exc.status}", exc.reason))
        headers = {name: exc.headers[name] for name in _KEPT_HEADERS if name in exc.headers}
        return error_response(exc.status, code, message, headers)
    except Exception:
        log.exception(
            "unexpected error answering %s %s",
            request.method,
            route_label(request),
            extra={"request_id": request.get(REQUEST_ID_KEY)},
        )
        return _internal_error()


def _internal_error() -> web.Response:
    return error_response(500, "internal", "Something went wrong on our side; try again later.")


def body_limit_middleware(max_body_bytes: int) -> Middleware:
    """Refuses a declared oversized body before reading it; client_max_size catches undeclared ones."""

    @web.middleware
    async def body_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
        length = request.content_length
        if length is not None and length > max_body_bytes:
            raise ApiError(
                413, "payload_too_large", f"The request body is larger than {max_body_bytes} bytes."
            )
        return await handler(request)

    return body_limit


class RateLimiter:
    """Token buckets per key (client IP): `rate` requests per second on average, bursts up to `burst`."""

    _PRUNE_ABOVE = 10_000

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._burst = float(max(1, burst))
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._pruned_at = clock()

    def acquire(self, key: str) -> float:
        """Takes one token; returns 0 when allowed, else the seconds until a token is available."""
        now = self._clock()
        tokens, updated = self._buckets.get(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - updated) * self._rate)
        if tokens >= 1:
            self._buckets[key] = (tokens - 1, now)
            wait = 0.0
        else:
            self._buckets[key] = (tokens, now)
            wait = (1 - tokens) / self._rate
        if len(self._buckets) > self._PRUNE_ABOVE and now - self._pruned_at >= 1.0:
            self._prune(now)
        return wait

    def _prune(self, now: float) -> None:
        # A bucket that has refilled completely is the same as no bucket: forget it, bound memory.
        self._pruned_at = now
        full_after = self._burst / self._rate
        self._buckets = {key: bucket for key, bucket in self._buckets.items() if now - bucket[1] < full_after}


def client_address(request: web.Request, trusted_proxy_hops: int) -> str:
    """The client's IP: behind N trusted proxies, the Nth X-Forwarded-For entry from the right.

    Each proxy appends the address it saw, so entries left of the trusted ones may be forged.
    """
    if trusted_proxy_hops > 0:
        forwarded = [
            entry.strip()
            for header in request.headers.getall("X-Forwarded-For", [])
            for entry in header.split(",")
            if entry.strip()
        ]
        if len(forwarded) >= trusted_proxy_hops:
            return forwarded[-trusted_proxy_hops]
    return request.remote or "unknown"


def rate_limit_middleware(
    limiter: RateLimiter, trusted_proxy_hops: int = 0, prefix: str = "/api/"
) -> Middleware:
    """Limits the API per client IP; pages, probes and metrics stay cheap and unlimited."""

    @web.middleware
    async def rate_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(prefix):
            wait = limiter.acquire(client_address(request, trusted_proxy_hops))
            if wait > 0:
                raise ApiError(
                    429,
                    "rate_limited",
                    "Too many requests from this address; slow down.",
                    {"Retry-After": str(max(1, math.ceil(wait)))},
                )
        return await handler(request)

    return rate_limit
