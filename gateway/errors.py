"""Errors the gateway answers with: one typed exception per cause, turned into JSON by the middleware,
and the one place a gRPC status becomes an HTTP answer."""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc

from services.common.errors import ERROR_CODE_METADATA, RETRY_AFTER_METADATA

_ERROR_CODE_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,63}")
_MAX_MESSAGE_CHARS = 300


class ApiError(Exception):
    """A client-facing error: the HTTP status, a snake_case code and a message safe to show anyone."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
        *,
        close_connection: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers: dict[str, str] = dict(headers or {})
        # Set when the rest of the request cannot be trusted or awaited (a body that did not decode
        # or did not arrive): the connection is closed after the answer instead of kept alive.
        self.close_connection = close_connection


class InvalidArgument(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(400, "invalid_argument", message)


class InvalidJson(ApiError):
    def __init__(self, message: str = "The request body is not valid JSON.") -> None:
        super().__init__(400, "invalid_json", message)


class MalformedBody(ApiError):
    def __init__(self) -> None:
        super().__init__(
            400,
            "malformed_body",
            "The request body could not be read; check its Content-Encoding and Transfer-Encoding.",
            close_connection=True,
        )


class BodyTimeout(ApiError):
    def __init__(self, seconds: float) -> None:
        super().__init__(
            408,
            "body_timeout",
            f"The request body did not arrive within {seconds:g} seconds.",
            close_connection=True,
        )


class UnsupportedMediaType(ApiError):
    def __init__(self, message: str = "Send the body as JSON (Content-Type: application/json).") -> None:
        super().__init__(415, "unsupported_media_type", message)


class Unauthorized(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(401, "unauthorized", message, {"WWW-Authenticate": 'Bearer realm="publisher"'})


class UpstreamError(Exception):
    """A gRPC call to a dependency failed; the middleware maps its status to HTTP in one place."""

    def __init__(self, dependency: str, method: str, error: grpc.aio.AioRpcError) -> None:
        super().__init__(f"{dependency}.{method} failed with {error.code().name}")
        self.dependency = dependency
        self.method = method
        self.error = error


@asynccontextmanager
async def calling(dependency: str, method: str) -> AsyncIterator[None]:
    """Wraps one gRPC call so a failure carries which dependency and method failed."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        raise UpstreamError(dependency, method, exc) from exc


@dataclass(frozen=True)
class _Mapping:
    status: int
    code: str
    message: str
    # Whether the status details are the service's own safe message (its contract), or may come from
    # the transport (addresses, internals) and must be replaced unless the service set an error code.
    details_are_safe: bool = True
    retry_after: int | None = None


# The one place a gRPC status becomes an HTTP answer (STYLE.md gateway/, DESIGN.md §7).
_GRPC_TO_HTTP: dict[grpc.StatusCode, _Mapping] = {
    grpc.StatusCode.INVALID_ARGUMENT: _Mapping(400, "invalid_argument", "The request is not valid."),
    grpc.StatusCode.UNAUTHENTICATED: _Mapping(401, "unauthenticated", "Credentials are missing or wrong."),
    grpc.StatusCode.PERMISSION_DENIED: _Mapping(403, "permission_denied", "This is not allowed."),
    grpc.StatusCode.NOT_FOUND: _Mapping(404, "not_found", "Not found."),
    grpc.StatusCode.ALREADY_EXISTS: _Mapping(409, "already_exists", "It already exists."),
    grpc.StatusCode.FAILED_PRECONDITION: _Mapping(
        409, "failed_precondition", "This cannot be done in the current state."
    ),
    grpc.StatusCode.RESOURCE_EXHAUSTED: _Mapping(
        503, "no_capacity", "No Stage can take another viewer right now; try again shortly.", retry_after=5
    ),
    grpc.StatusCode.UNAVAILABLE: _Mapping(
        503,
        "dependency_unavailable",
        "A backend service is unavailable; try again shortly.",
        details_are_safe=False,
        retry_after=2,
    ),
    grpc.StatusCode.DEADLINE_EXCEEDED: _Mapping(
        504, "dependency_timeout", "A backend service did not answer in time.", details_are_safe=False
    ),
}


def api_error_from_grpc(error: grpc.aio.AioRpcError) -> ApiError | None:
    """The HTTP answer for a failed gRPC call, or None when it is unexpected (answered as a bare 500)."""
    mapping = _GRPC_TO_HTTP.get(error.code())
    if mapping is None:
        return None
    metadata = _trailing_metadata(error)
    service_code = metadata.get(ERROR_CODE_METADATA, "")
    has_service_code = bool(_ERROR_CODE_PATTERN.fullmatch(service_code))
    # A service's generic code ("unavailable" for UNAVAILABLE) says less than the gateway's default.
    is_specific = has_service_code and service_code != error.code().name.lower()
    code = service_code if is_specific else mapping.code
    message = mapping.message
    details = error.details()
    if isinstance(details, str) and details.strip() and (mapping.details_are_safe or has_service_code):
        message = details.strip()[:_MAX_MESSAGE_CHARS]
    headers: dict[str, str] = {}
    if mapping.retry_after is not None:
        seconds = _retry_after_seconds(metadata.get(RETRY_AFTER_METADATA), mapping.retry_after)
        headers["Retry-After"] = str(seconds)
    return ApiError(mapping.status, code, message, headers)


def _trailing_metadata(error: grpc.aio.AioRpcError) -> dict[str, str]:
    pairs: Iterable[tuple[str, str | bytes]] = error.trailing_metadata() or ()
    return {key.lower(): value for key, value in pairs if isinstance(value, str)}


def _retry_after_seconds(raw: str | None, default: int) -> int:
    try:
        seconds = float(raw) if raw is not None else float(default)
    except ValueError:
        seconds = float(default)
    if not math.isfinite(seconds):
        seconds = float(default)
    return min(3600, max(1, math.ceil(seconds)))
