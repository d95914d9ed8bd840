"""Errors the gateway answers with: one typed exception per cause, turned into JSON by the middleware."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import grpc


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
